//! Scenario and property tests of the aggregation rules.
//!
//! The property tests generate clusters (zones, backends, probers that are
//! fresh or stale, each seeing each backend in some way), feed the probers'
//! FULL reports and check the rules of the module docs: some as
//! metamorphic relations (adding an isolated or a stale prober changes no
//! verdict), some against a direct restatement of the rule.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bulwark_api::lb::v1::{
    Observation, ProbeKind, ProbeReason, ProbeReport, ProberIdentity, ReportKind,
};
use proptest::prelude::*;

use super::*;
use crate::backends::{AdminState, BackendSpec, Verdict};

// ---------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------

/// One probe outcome as the prober reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Ok,
    Http500,
    Refused,
    Timeout,
}

impl Probe {
    fn observation(self, target: &str, kind: ProbeKind) -> Observation {
        let (ok, reason, http_status) = match self {
            Probe::Ok => (true, ProbeReason::Ok, Some(200)),
            Probe::Http500 => (false, ProbeReason::HttpStatus, Some(500)),
            Probe::Refused => (false, ProbeReason::ConnectionRefused, None),
            Probe::Timeout => (false, ProbeReason::Timeout, None),
        };
        Observation {
            target_id: target.into(),
            target_address: "127.0.0.1:6443".into(),
            kind: kind as i32,
            ok,
            reason: reason as i32,
            http_status,
            ..Default::default()
        }
    }
}

/// What one prober sees of one backend: `/readyz`, and `/livez` if probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sight {
    readyz: Probe,
    livez: Option<Probe>,
}

const UP: Sight = Sight {
    readyz: Probe::Ok,
    livez: Some(Probe::Ok),
};
const DRAINING: Sight = Sight {
    readyz: Probe::Http500,
    livez: Some(Probe::Ok),
};
const DEAD: Sight = Sight {
    readyz: Probe::Refused,
    livez: Some(Probe::Refused),
};

#[derive(Clone, Debug)]
struct ProberSpec {
    zone: usize,
    fresh: bool,
    /// Per backend (by index); `None`: not probed.
    sights: Vec<Option<Sight>>,
}

#[derive(Clone, Debug)]
struct Scenario {
    /// Per backend: zone index and whether admin-active.
    backends: Vec<(usize, bool)>,
    probers: Vec<ProberSpec>,
}

fn zone(i: usize) -> String {
    format!("z{i}")
}

fn backend_id(i: usize) -> String {
    format!("b{i}")
}

fn prober_name(i: usize) -> String {
    format!("p{i}")
}

fn specs(s: &Scenario) -> Vec<BackendSpec> {
    s.backends
        .iter()
        .enumerate()
        .map(|(i, (z, active))| BackendSpec {
            id: backend_id(i),
            address: format!("127.0.0.{}:6443", i + 1).parse().unwrap(),
            zone: zone(*z),
            weight: 1,
            admin: if *active {
                AdminState::Active
            } else {
                AdminState::Drain { deadline: None }
            },
            verdict: Verdict::Unknown,
        })
        .collect()
}

fn full_report(name: &str, p: &ProberSpec, sequence: u64) -> ProbeReport {
    let mut observations = Vec::new();
    for (i, sight) in p.sights.iter().enumerate() {
        let Some(sight) = sight else { continue };
        let id = backend_id(i);
        observations.push(sight.readyz.observation(&id, ProbeKind::Readyz));
        if let Some(l) = sight.livez {
            observations.push(l.observation(&id, ProbeKind::Livez));
        }
    }
    ProbeReport {
        prober: Some(ProberIdentity {
            node_name: name.into(),
            zone: zone(p.zone),
            instance_id: format!("{name}-instance"),
        }),
        sequence,
        kind: ReportKind::Full as i32,
        observations,
        sent_at: None,
    }
}

/// The test clock: stale probers last reported at `t0`, fresh ones at `now`.
struct Clock {
    t0: Instant,
    now: Instant,
}

fn clock(config: &HealthConfig) -> Clock {
    let t0 = Instant::now();
    Clock {
        t0,
        now: t0 + config.stale_after + Duration::from_secs(1),
    }
}

/// Feeds the scenario and evaluates once.
fn run(s: &Scenario, config: &HealthConfig) -> (HealthAggregator, Evaluation, Clock) {
    let c = clock(config);
    let mut agg = HealthAggregator::new(config.clone(), c.t0);
    agg.set_backends(&specs(s));
    for (i, p) in s.probers.iter().enumerate() {
        let at = if p.fresh { c.now } else { c.t0 };
        let outcome = agg.report(&full_report(&prober_name(i), p, 1), at).unwrap();
        assert!(!outcome.resync_required);
    }
    let eval = agg.evaluate(c.now);
    (agg, eval, c)
}

fn verdicts(agg: &HealthAggregator, s: &Scenario) -> Vec<Verdict> {
    (0..s.backends.len())
        .map(|i| agg.verdict(&backend_id(i)).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// The rules restated, for the model-based properties
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModelView {
    Up,
    NotReady,
    Down,
}

fn model_view(s: Sight) -> ModelView {
    match (s.readyz, s.livez) {
        (_, Some(Probe::Refused | Probe::Timeout | Probe::Http500)) => ModelView::Down,
        (Probe::Ok, _) => ModelView::Up,
        (Probe::Http500, _) => ModelView::NotReady,
        (_, Some(Probe::Ok)) => ModelView::NotReady,
        (_, None) => ModelView::Down,
    }
}

fn model_isolated(s: &Scenario) -> Vec<bool> {
    let views = |p: &ProberSpec| {
        p.sights
            .iter()
            .flatten()
            .map(|s| model_view(*s))
            .collect::<Vec<_>>()
    };
    let someone_alive = s
        .probers
        .iter()
        .any(|p| p.fresh && views(p).iter().any(|v| *v != ModelView::Down));
    s.probers
        .iter()
        .map(|p| {
            let v = views(p);
            p.fresh && someone_alive && !v.is_empty() && v.iter().all(|v| *v == ModelView::Down)
        })
        .collect()
}

/// (zones Down, zones NotReady-or-Down, zones Up, zones reporting,
/// Down votes, failing votes) for backend `b`.
fn model_counts(s: &Scenario, b: usize) -> (usize, usize, usize, usize, u32, u32) {
    let isolated = model_isolated(s);
    let mut zones: BTreeMap<usize, (u32, u32, u32)> = BTreeMap::new();
    for (i, p) in s.probers.iter().enumerate() {
        if !p.fresh || isolated[i] {
            continue;
        }
        let Some(sight) = p.sights[b] else { continue };
        let z = zones.entry(p.zone).or_default();
        match model_view(sight) {
            ModelView::Up => z.0 += 1,
            ModelView::NotReady => z.1 += 1,
            ModelView::Down => z.2 += 1,
        }
    }
    let (mut down_z, mut bad_z, mut up_z) = (0, 0, 0);
    let (mut down_v, mut bad_v) = (0, 0);
    for (up, nr, down) in zones.values() {
        let n = up + nr + down;
        down_v += down;
        bad_v += down + nr;
        if down * 2 > n {
            down_z += 1;
            bad_z += 1;
        } else if (down + nr) * 2 > n {
            bad_z += 1;
        } else {
            up_z += 1;
        }
    }
    (down_z, bad_z, up_z, zones.len(), down_v, bad_v)
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn probe() -> impl Strategy<Value = Probe> {
    prop_oneof![
        3 => Just(Probe::Ok),
        1 => Just(Probe::Http500),
        2 => Just(Probe::Refused),
        1 => Just(Probe::Timeout),
    ]
}

fn sight() -> impl Strategy<Value = Sight> {
    prop_oneof![
        3 => Just(UP),
        1 => Just(DRAINING),
        2 => Just(DEAD),
        2 => (probe(), prop::option::weighted(0.8, probe()))
            .prop_map(|(readyz, livez)| Sight { readyz, livez }),
    ]
}

fn prober(zones: usize, backends: usize) -> impl Strategy<Value = ProberSpec> {
    (
        0..zones,
        prop::bool::weighted(0.85),
        prop::collection::vec(prop::option::weighted(0.9, sight()), backends),
    )
        .prop_map(|(zone, fresh, sights)| ProberSpec {
            zone,
            fresh,
            sights,
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..=3, 1usize..=4).prop_flat_map(|(zones, backends)| {
        (
            prop::collection::vec((0..zones, prop::bool::weighted(0.9)), backends),
            prop::collection::vec(prober(zones, backends), 1..=6),
        )
            .prop_map(|(backends, probers)| Scenario { backends, probers })
    })
}

fn config() -> impl Strategy<Value = HealthConfig> {
    (
        prop_oneof![
            3 => Just(ZoneQuorum::Majority),
            1 => (1u32..=3).prop_map(ZoneQuorum::Zones),
        ],
        1u32..=3,
    )
        .prop_map(|(zone_quorum, min_votes)| HealthConfig {
            zone_quorum,
            min_votes,
            ..HealthConfig::default()
        })
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    /// One prober alone never evicts: when at most one prober (whatever
    /// its standing) sees a backend failing, that backend is not Down or
    /// Draining, under the default minVotes.
    #[test]
    fn one_prober_alone_never_evicts(
        s in scenario(),
        loner in any::<prop::sample::Index>(),
        loner_sights in prop::collection::vec(prop::option::of(sight()), 4),
    ) {
        let mut s = s;
        let loner = loner.index(s.probers.len());
        for (i, p) in s.probers.iter_mut().enumerate() {
            for (b, sight) in p.sights.iter_mut().enumerate() {
                *sight = if i == loner { loner_sights[b] } else { sight.map(|_| UP) };
            }
        }
        let (agg, _, _) = run(&s, &HealthConfig::default());
        for v in verdicts(&agg, &s) {
            prop_assert!(v.is_routable(), "{v:?} with one failing prober: {s:?}");
        }
    }

    /// An isolated prober's votes are ignored: adding a fresh prober that
    /// sees everything down, to a cluster where someone reaches a live
    /// backend, changes no verdict, and that prober is reported isolated.
    #[test]
    fn isolated_probers_votes_are_ignored(s in scenario(), config in config(), z in 0usize..3) {
        let (before, _, _) = run(&s, &config);
        let mut with = s.clone();
        let n = s.backends.len();
        with.probers.push(ProberSpec {
            zone: z,
            fresh: true,
            sights: vec![Some(DEAD); n],
        });
        let someone_alive = s.probers.iter().any(|p| {
            p.fresh && p.sights.iter().flatten().any(|x| model_view(*x) != ModelView::Down)
        });
        let (after, _, c) = run(&with, &config);
        let name = prober_name(with.probers.len() - 1);
        let status = after.status(c.now);
        let isolated = status.probers.iter().find(|p| p.node_name == name).unwrap().isolated;
        prop_assert_eq!(isolated, someone_alive);
        if someone_alive {
            prop_assert_eq!(verdicts(&before, &s), verdicts(&after, &with));
        }
    }

    /// Stale probers do not count: adding a stale prober with any sights
    /// changes no verdict.
    #[test]
    fn stale_probers_do_not_count(s in scenario(), config in config(), extra in prober(3, 4)) {
        let (before, _, _) = run(&s, &config);
        let mut with = s.clone();
        let mut extra = extra;
        extra.fresh = false;
        extra.zone = 0;
        extra.sights.truncate(s.backends.len());
        extra.sights.resize(s.backends.len(), Some(DEAD));
        with.probers.push(extra);
        let (after, _, c) = run(&with, &config);
        prop_assert_eq!(verdicts(&before, &s), verdicts(&after, &with));
        let name = prober_name(with.probers.len() - 1);
        prop_assert!(after.status(c.now).probers.iter().any(|p| p.node_name == name && p.stale));
    }

    /// Down iff a zone quorum of counted (fresh, non-isolated) probers say
    /// Down, with at least minVotes of them; Draining iff not Down and a
    /// zone quorum says readyz fails while alive (or down), with minVotes;
    /// Healthy iff neither and a zone quorum says Up; Unknown otherwise.
    #[test]
    fn verdicts_follow_zone_quorums(s in scenario(), config in config()) {
        let (agg, _, _) = run(&s, &config);
        for (b, verdict) in verdicts(&agg, &s).into_iter().enumerate() {
            let (down_z, bad_z, up_z, reporting, down_v, bad_v) = model_counts(&s, b);
            let q = config.zone_quorum.required(reporting);
            let down = reporting > 0 && down_z >= q && down_v >= config.min_votes;
            let draining = !down && reporting > 0 && bad_z >= q && bad_v >= config.min_votes;
            let healthy = !down && !draining && reporting > 0 && up_z >= q;
            prop_assert_eq!(verdict == Verdict::Down, down, "b{} {:?}", b, s);
            prop_assert_eq!(verdict == Verdict::Draining, draining, "b{} {:?}", b, s);
            prop_assert_eq!(verdict == Verdict::Healthy, healthy, "b{} {:?}", b, s);
        }
    }

    /// Fail-open iff every admin-active backend is non-routable by verdict
    /// (and there is one); a zone is down iff none of its backends routes.
    #[test]
    fn fail_open_and_zones_down(s in scenario(), config in config()) {
        let (agg, _, c) = run(&s, &config);
        let v = verdicts(&agg, &s);
        let active: Vec<Verdict> = s.backends.iter().zip(&v).filter(|(b, _)| b.1).map(|(_, v)| *v).collect();
        let all_down = !active.is_empty() && active.iter().all(|v| matches!(v, Verdict::Down | Verdict::Draining));
        prop_assert_eq!(agg.fail_open(), all_down);
        prop_assert_eq!(agg.status(c.now).fail_open, all_down);
        let mut registry = specs(&s);
        for (spec, verdict) in registry.iter_mut().zip(&v) {
            spec.verdict = *verdict;
        }
        prop_assert_eq!(fail_open(&registry), all_down);
        for z in 0..3 {
            let in_zone: Vec<Verdict> = s.backends.iter().zip(&v).filter(|(b, _)| b.0 == z).map(|(_, v)| *v).collect();
            let down = !in_zone.is_empty() && in_zone.iter().all(|v| !v.is_routable());
            prop_assert_eq!(agg.zones_down().contains(&zone(z)), down);
            prop_assert_eq!(zones_down(&registry).contains(&zone(z)), down);
        }
    }

    /// Changes only: evaluating again, re-sending every prober's state as a
    /// new FULL, or sending heartbeats and empty CHANGES emits nothing; the
    /// first evaluation emitted exactly the verdicts that differ from the
    /// registry's.
    #[test]
    fn changes_only_output_is_idempotent(s in scenario(), config in config()) {
        let (mut agg, first, c) = run(&s, &config);
        let changed: Vec<String> = first.verdicts.iter().map(|ch| ch.backend_id.clone()).collect();
        let expected: Vec<String> = verdicts(&agg, &s)
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != Verdict::Unknown)
            .map(|(i, _)| backend_id(i))
            .collect();
        prop_assert_eq!(changed, expected);
        for ch in &first.verdicts {
            prop_assert_eq!(ch.from, Verdict::Unknown);
            prop_assert_ne!(ch.from, ch.to);
        }

        prop_assert!(agg.evaluate(c.now).is_empty());
        for (i, p) in s.probers.iter().enumerate() {
            let at = if p.fresh { c.now } else { c.t0 };
            agg.report(&full_report(&prober_name(i), p, 2), at).unwrap();
            let mut hb = full_report(&prober_name(i), p, 3);
            hb.kind = ReportKind::Heartbeat as i32;
            hb.observations.clear();
            agg.report(&hb, at).unwrap();
            let mut empty = hb.clone();
            empty.kind = ReportKind::Changes as i32;
            empty.sequence = 4;
            agg.report(&empty, at).unwrap();
        }
        prop_assert!(agg.evaluate(c.now).is_empty());
        // The same registry again (as after committing) changes nothing.
        agg.set_backends(&specs(&s));
        prop_assert!(agg.evaluate(c.now).is_empty());
    }
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

fn three_zones() -> Scenario {
    Scenario {
        backends: vec![(0, true), (1, true), (2, true)],
        probers: (0..3)
            .map(|z| ProberSpec {
                zone: z,
                fresh: true,
                sights: vec![Some(UP); 3],
            })
            .collect(),
    }
}

fn send(agg: &mut HealthAggregator, s: &Scenario, prober: usize, seq: u64, now: Instant) {
    let outcome = agg
        .report(
            &full_report(&prober_name(prober), &s.probers[prober], seq),
            now,
        )
        .unwrap();
    assert_eq!(outcome.accepted_sequence, seq);
}

#[test]
fn a_killed_backend_goes_down_once_and_comes_back() {
    let config = HealthConfig::default();
    let mut s = three_zones();
    let (mut agg, first, c) = run(&s, &config);
    assert_eq!(first.verdicts.len(), 3);
    assert!(first.verdicts.iter().all(|ch| ch.to == Verdict::Healthy));

    // b1 dies: the first prober to notice changes nothing on its own.
    s.probers[0].sights[1] = Some(DEAD);
    send(&mut agg, &s, 0, 2, c.now);
    assert!(agg.evaluate(c.now).is_empty());
    assert_eq!(agg.verdict("b1"), Some(Verdict::Healthy));

    // The second zone agrees: Down, with the reason.
    s.probers[1].sights[1] = Some(DEAD);
    send(&mut agg, &s, 1, 2, c.now);
    let e = agg.evaluate(c.now);
    assert_eq!(
        e.verdicts,
        vec![VerdictChange {
            backend_id: "b1".into(),
            from: Verdict::Healthy,
            to: Verdict::Down,
            reason: "down in 2/3 zones (connection refused)".into(),
        }]
    );
    assert!(agg.evaluate(c.now).is_empty());
    assert!(!agg.fail_open());
    assert_eq!(agg.zones_down(), vec!["z1".to_owned()]);

    // Recovery needs the quorum too: two zones of three seeing it up.
    s.probers[0].sights[1] = Some(UP);
    send(&mut agg, &s, 0, 3, c.now);
    let e = agg.evaluate(c.now);
    assert_eq!(e.verdicts[0].to, Verdict::Healthy);
    assert_eq!(e.verdicts[0].reason, "up in 2/3 zones");
    assert!(agg.zones_down().is_empty());
    s.probers[1].sights[1] = Some(UP);
    send(&mut agg, &s, 1, 3, c.now);
    assert!(agg.evaluate(c.now).verdicts.is_empty());
}

#[test]
fn graceful_shutdown_drains_then_goes_down() {
    let config = HealthConfig::default();
    let mut s = three_zones();
    let (mut agg, _, c) = run(&s, &config);
    for p in 0..3 {
        s.probers[p].sights[2] = Some(DRAINING);
        send(&mut agg, &s, p, 2, c.now);
    }
    let e = agg.evaluate(c.now);
    assert_eq!(e.verdicts.len(), 1);
    assert_eq!(e.verdicts[0].to, Verdict::Draining);
    assert_eq!(
        e.verdicts[0].reason,
        "readyz failing while alive in 3/3 zones (HTTP 500)"
    );
    for p in 0..3 {
        s.probers[p].sights[2] = Some(DEAD);
        send(&mut agg, &s, p, 3, c.now);
    }
    assert_eq!(agg.evaluate(c.now).verdicts[0].to, Verdict::Down);
}

#[test]
fn a_partitioned_prober_is_isolated_and_evicts_nothing() {
    let config = HealthConfig::default();
    let mut s = three_zones();
    // Two probers in zone 0, so the partitioned one's zone still reports.
    s.probers.push(ProberSpec {
        zone: 0,
        fresh: true,
        sights: vec![Some(UP); 3],
    });
    let (mut agg, _, c) = run(&s, &config);
    s.probers[0].sights = vec![Some(DEAD); 3];
    send(&mut agg, &s, 0, 2, c.now);
    let e = agg.evaluate(c.now);
    assert!(e.verdicts.is_empty(), "{e:?}");
    assert_eq!(
        e.probers,
        vec![ProberChange {
            node_name: "p0".into(),
            zone: "z0".into(),
            isolated: true,
            stale: false,
        }]
    );
    let status = agg.status(c.now);
    let b0 = &status.backends[0];
    let z0 = b0.zones.iter().find(|z| z.zone == "z0").unwrap();
    assert_eq!((z0.tally.up, z0.tally.ignored), (1, 1));
    assert!(b0.probers.iter().any(|p| p.node_name == "p0" && !p.counted));

    // It recovers: counted again.
    s.probers[0].sights = vec![Some(UP); 3];
    send(&mut agg, &s, 0, 3, c.now);
    let e = agg.evaluate(c.now);
    assert!(e.verdicts.is_empty());
    assert!(!e.probers[0].isolated);
}

#[test]
fn everything_down_fails_open() {
    let config = HealthConfig::default();
    let mut s = three_zones();
    let (mut agg, _, c) = run(&s, &config);
    for p in 0..3 {
        s.probers[p].sights = vec![Some(DEAD); 3];
        send(&mut agg, &s, p, 2, c.now);
    }
    let e = agg.evaluate(c.now);
    // Everyone sees everything down: nobody is isolated, it is an outage.
    assert!(e.probers.is_empty());
    assert_eq!(e.verdicts.len(), 3);
    assert!(agg.fail_open());
    assert_eq!(agg.zones_down(), vec!["z0", "z1", "z2"]);
}

#[test]
fn silent_probers_go_stale_and_stop_counting() {
    let config = HealthConfig::default();
    let mut s = three_zones();
    let (mut agg, _, c) = run(&s, &config);
    for p in 0..2 {
        s.probers[p].sights[0] = Some(DEAD);
        send(&mut agg, &s, p, 2, c.now);
    }
    assert_eq!(agg.evaluate(c.now).verdicts[0].to, Verdict::Down);
    // Prober 1 falls silent; the others keep heartbeating.
    let later = c.now + config.stale_after + Duration::from_millis(1);
    for (p, seq) in [(0, 3), (2, 2)] {
        let mut hb = full_report(&prober_name(p), &s.probers[p], seq);
        hb.kind = ReportKind::Heartbeat as i32;
        hb.observations.clear();
        agg.report(&hb, later).unwrap();
    }
    let e = agg.evaluate(later);
    assert_eq!(e.probers.len(), 1);
    assert!(e.probers[0].stale && e.probers[0].node_name == "p1");
    // One counted prober left seeing it down: no quorum, so Unknown.
    assert_eq!(e.verdicts[0].to, Verdict::Unknown);
}

#[test]
fn registry_changes_keep_pending_verdicts_and_forget_removed_backends() {
    let config = HealthConfig::default();
    let s = three_zones();
    let (mut agg, first, c) = run(&s, &config);
    assert_eq!(first.verdicts.len(), 3);
    // The registry still says Unknown (the change is being committed):
    // the aggregator keeps its Healthy and does not emit again.
    let mut registry = specs(&s);
    registry.pop();
    agg.set_backends(&registry);
    assert!(agg.evaluate(c.now).is_empty());
    assert_eq!(agg.verdict("b2"), None);
    assert_eq!(agg.status(c.now).backends.len(), 2);
    // A new backend starts from its committed verdict.
    let mut added = specs(&three_zones());
    added[2].verdict = Verdict::Down;
    agg.set_backends(&added);
    assert_eq!(agg.verdict("b2"), Some(Verdict::Down));
    assert_eq!(agg.evaluate(c.now).verdicts[0].to, Verdict::Healthy);
}

#[test]
fn a_new_leader_rebuilds_from_full_reports() {
    let config = HealthConfig::default();
    let mut s = three_zones();
    s.probers[0].sights[0] = Some(DEAD);
    s.probers[1].sights[0] = Some(DEAD);
    let (old, _, c) = run(&s, &config);
    assert_eq!(old.verdict("b0"), Some(Verdict::Down));

    // The new leader starts from the committed registry; probers arrive
    // with their next sequence numbers (CHANGES first gets a resync).
    let mut registry = specs(&s);
    registry[0].verdict = Verdict::Down;
    registry[1].verdict = Verdict::Healthy;
    registry[2].verdict = Verdict::Healthy;
    let mut new = HealthAggregator::new(config.clone(), c.now);
    new.set_backends(&registry);
    let mut changes = full_report("p0", &s.probers[0], 7);
    changes.kind = ReportKind::Changes as i32;
    assert!(new.report(&changes, c.now).unwrap().resync_required);
    for p in 0..3 {
        send(&mut new, &s, p, 8, c.now);
    }
    let warm = c.now + config.stale_after;
    assert!(new.evaluate(warm).verdicts.is_empty());
    assert_eq!(new.verdict("b0"), Some(Verdict::Down));
}

#[test]
fn a_new_leader_keeps_committed_verdicts_until_probers_had_time_to_report() {
    let config = HealthConfig::default();
    let s = three_zones();
    let start = Instant::now();
    let mut registry = specs(&s);
    registry[0].verdict = Verdict::Down;
    let mut agg = HealthAggregator::new(config.clone(), start);
    agg.set_backends(&registry);
    // Nobody has reported yet: nothing moves during the warm-up...
    let almost = start + config.stale_after - Duration::from_millis(1);
    assert!(!agg.is_warm(almost));
    assert!(agg.evaluate(almost).is_empty());
    assert_eq!(agg.verdict("b0"), Some(Verdict::Down));
    // ...and probers that report in time decide once it is over.
    for p in 0..3 {
        send(&mut agg, &s, p, 1, almost);
    }
    let e = agg.evaluate(start + config.stale_after);
    assert_eq!(e.verdicts.len(), 3);
    assert!(e.verdicts.iter().all(|v| v.to == Verdict::Healthy));
}

#[test]
fn etcd_and_unknown_targets_do_not_vote() {
    let config = HealthConfig {
        min_votes: 1,
        ..HealthConfig::default()
    };
    let now = Instant::now();
    let mut agg = HealthAggregator::new(config.clone(), now);
    let now = now + config.stale_after;
    let s = Scenario {
        backends: vec![(0, true)],
        probers: vec![],
    };
    agg.set_backends(&specs(&s));
    let report = ProbeReport {
        prober: Some(ProberIdentity {
            node_name: "p".into(),
            zone: "z0".into(),
            instance_id: "i".into(),
        }),
        sequence: 1,
        kind: ReportKind::Full as i32,
        observations: vec![
            Probe::Refused.observation("b0", ProbeKind::Etcd),
            Probe::Refused.observation("not-a-backend", ProbeKind::Readyz),
        ],
        sent_at: None,
    };
    agg.report(&report, now).unwrap();
    assert!(agg.evaluate(now).verdicts.is_empty());
    assert_eq!(agg.verdict("b0"), Some(Verdict::Unknown));
    let status = agg.status(now);
    assert!(status.backends[0].probers.is_empty());
    assert!(!status.probers[0].isolated);
}
