//! From one run's events to its figures.
//!
//! - client-visible gap: the longest time between two successful short
//!   requests (completions, all requesters together) that ends after the
//!   first fault; in steady state it is a few ms;
//! - failed requests, failed connects (TCP + TLS + HTTP/2, 1 s timeout),
//!   watch streams lost: counted from the first fault on;
//! - latency p50/p99 of successful short requests by start time: before
//!   the first fault, during (from the first fault to `during_s` after the
//!   last), after;
//! - watch streams back: for every watcher that lost its stream after the
//!   fault, the time from the fault to its next stream; "all back" is the
//!   slowest;
//! - time to detect: VIP scenarios: bulwark's own failover record (last
//!   contact with the old leader to election won), for the baseline the
//!   fault to keepalived logging `Entering MASTER STATE` on another host;
//!   backend scenarios (apiserver kill/shutdown, prober isolated): the fault
//!   to bulwark's leader logging a committed verdict change, or to HAProxy
//!   logging a server DOWN; logs polled every 20 ms;
//! - time to move the VIP: the fault to the `ip addr` sampler (every ~10 ms
//!   plus the sweep) first seeing the VIP on another host, for both; plus
//!   bulwark's record (election won to VIP announced);
//! - two holders: how long the sampler saw the VIP on more than one host
//!   (bgp mode: on `lo`);
//! - bgp mode, the router's view (`birdc show route`, sampled the same
//!   way): route moved, the fault to the router's best route first going
//!   via another host (where the clients' packets go from then on); two
//!   routes, how long the router had routes via two hosts (a cut-off or
//!   killed holder's route lingers until withdrawn or the hold timer).

use bulwark_api::lb::v1 as lb;
use serde::Serialize;

use super::load::{Event, Kind};
use super::{Contender, Marker, Params, Scenario};
use crate::stats::{ms_cell, percentile};

/// What one run produced.
pub struct Input<'a> {
    pub scenario: Scenario,
    pub contender: Contender,
    pub params: &'a Params,
    pub watchers: usize,
    pub holder: usize,
    pub events: &'a [Event],
    pub markers: Vec<Marker>,
    pub load_ready_ns: u64,
    pub load_end_ns: u64,
    pub vip_changes: Vec<(u64, Vec<usize>)>,
    /// bgp mode: the hosts the router routes the VIP via, best first, as
    /// they changed.
    pub route_changes: Option<Vec<(u64, Vec<usize>)>>,
    pub keepalived_master_ns: Option<u64>,
    /// First backend verdict after the fault: bulwark's committed verdict
    /// change, HAProxy's server DOWN.
    pub backend_verdict_ns: Option<u64>,
    pub failovers: Vec<lb::Failover>,
}

/// p50 and p99 of a phase, ms.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One plot bucket (rates per second).
#[derive(Clone, Debug, Serialize)]
pub struct Bucket {
    /// Bucket start, s from the first fault.
    pub t_s: f64,
    pub ok_rps: f64,
    pub failed_rps: f64,
    pub watch_lost_ps: f64,
}

/// The figures of one scenario with one contender.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub scenario: Scenario,
    pub contender: Contender,
    pub watchers: usize,
    pub requesters: usize,
    /// LB host (1-based) holding the VIP when the fault came.
    pub holder_before: usize,
    pub markers: Vec<Marker>,
    pub gap_ms: f64,
    pub requests_after_fault: usize,
    pub failed_requests: usize,
    pub connects_after_fault: usize,
    pub failed_connects: usize,
    pub watch_streams_lost: usize,
    /// Time from the fault until every lost stream was back (ms), and the
    /// median; `None` when none was lost.
    pub watch_all_back_ms: Option<f64>,
    pub watch_median_back_ms: Option<f64>,
    pub watch_p99_back_ms: Option<f64>,
    pub watch_never_back: usize,
    pub latency_before: Latency,
    pub latency_during: Latency,
    /// Successful connects (TCP, TLS and HTTP/2 handshakes through the
    /// front) started in the same window: what a client that connects
    /// then waits, a backend the front tries first and in vain included.
    pub connect_latency_during: Latency,
    pub latency_after: Latency,
    pub time_to_detect_ms: Option<f64>,
    /// Where `time_to_detect_ms` comes from.
    pub detect_source: String,
    pub vip_moved_ms: Option<f64>,
    /// bulwark's record: election won to VIP announced.
    pub record_move_ms: Option<f64>,
    pub two_holders_ms: f64,
    /// bgp mode: the fault to the router's best route going via another
    /// host.
    pub route_moved_ms: Option<f64>,
    /// bgp mode: time with routes via two hosts.
    pub two_routes_ms: Option<f64>,
    pub failure_kinds: Vec<(String, usize)>,
    pub series: Vec<Bucket>,
}

impl RunResult {
    /// A progress line.
    pub fn one_line(&self) -> String {
        format!(
            "gap {:.0} ms, failed req {}/{}, failed conn {}/{}, watches lost {} (all back {}), detect {}, VIP moved {}",
            self.gap_ms,
            self.failed_requests,
            self.requests_after_fault,
            self.failed_connects,
            self.connects_after_fault,
            self.watch_streams_lost,
            ms_cell(self.watch_all_back_ms),
            ms_cell(self.time_to_detect_ms),
            ms_cell(self.vip_moved_ms),
        )
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn latency(mut v: Vec<f64>) -> Latency {
    v.sort_by(f64::total_cmp);
    Latency {
        n: v.len(),
        p50_ms: percentile(&v, 50.0),
        p99_ms: percentile(&v, 99.0),
    }
}

fn pb_ms(d: Option<prost_types::Duration>) -> Option<f64> {
    d.map(|d| d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6)
}

fn ts_ns(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map_or(0, |t| {
        (t.seconds.max(0) as u64) * 1_000_000_000 + t.nanos.max(0) as u64
    })
}

/// Computes the figures.
pub fn analyse(i: Input<'_>) -> RunResult {
    let fault = i.markers.first().map_or(i.load_ready_ns, |m| m.at_ns);
    let last_fault = i.markers.last().map_or(fault, |m| m.at_ns);
    let during_end = last_fault + (i.params.during_s * 1e9) as u64;

    let requests: Vec<&Event> = i
        .events
        .iter()
        .filter(|e| e.kind == Kind::Request && e.start_ns >= i.load_ready_ns)
        .collect();
    let gap = longest_gap(&requests, fault, i.load_end_ns);
    let after_fault = |e: &&Event| e.end_ns >= fault;
    let req_after: Vec<&Event> = requests.iter().copied().filter(after_fault).collect();
    let connects: Vec<&Event> = i
        .events
        .iter()
        .filter(|e| e.kind == Kind::Connect)
        .filter(after_fault)
        .collect();
    let phase = |lo: u64, hi: u64| {
        latency(
            requests
                .iter()
                .filter(|e| e.ok && e.start_ns >= lo && e.start_ns < hi)
                .map(|e| ms(e.end_ns - e.start_ns))
                .collect(),
        )
    };
    let watches = watch_recovery(&i, fault);
    let vip_scenario = !matches!(
        i.scenario,
        Scenario::ApiserverKill
            | Scenario::ApiserverShutdown
            | Scenario::ProberIsolated
            | Scenario::StormReset
    );
    let record = i
        .failovers
        .iter()
        .filter(|f| ts_ns(f.at.as_ref()) >= fault)
        .min_by_key(|f| ts_ns(f.at.as_ref()));
    let (detect, source) = detection(&i, fault, vip_scenario, record);

    RunResult {
        scenario: i.scenario,
        contender: i.contender,
        watchers: i.watchers,
        requesters: i.params.requesters,
        holder_before: i.holder + 1,
        markers: i.markers.clone(),
        gap_ms: ms(gap),
        requests_after_fault: req_after.len(),
        failed_requests: req_after.iter().filter(|e| !e.ok).count(),
        connects_after_fault: connects.len(),
        failed_connects: connects.iter().filter(|e| !e.ok).count(),
        watch_streams_lost: watches.lost,
        watch_all_back_ms: watches.back.last().copied().filter(|_| watches.never == 0),
        watch_median_back_ms: (!watches.back.is_empty()).then(|| percentile(&watches.back, 50.0)),
        watch_p99_back_ms: (!watches.back.is_empty()).then(|| percentile(&watches.back, 99.0)),
        watch_never_back: watches.never,
        latency_before: phase(i.load_ready_ns, fault),
        latency_during: phase(fault, during_end),
        connect_latency_during: latency(
            connects
                .iter()
                .filter(|e| e.ok && e.start_ns < during_end)
                .map(|e| ms(e.end_ns - e.start_ns))
                .collect(),
        ),
        latency_after: phase(during_end, i.load_end_ns),
        time_to_detect_ms: detect,
        detect_source: source,
        vip_moved_ms: vip_moved(&i, fault),
        record_move_ms: if i.contender.is_bulwark() && vip_scenario {
            record.and_then(|f| pb_ms(f.time_to_move_vip))
        } else {
            None
        },
        two_holders_ms: ms(two_holders_ns(&i.vip_changes, i.load_end_ns)),
        route_moved_ms: i.route_changes.as_ref().and_then(|c| {
            c.iter()
                .find(|(t, via)| *t >= fault && via.first().is_some_and(|&h| h != i.holder))
                .map(|(t, _)| ms(t - fault))
        }),
        two_routes_ms: i
            .route_changes
            .as_ref()
            .map(|c| ms(two_holders_ns(c, i.load_end_ns))),
        failure_kinds: failure_kinds(&req_after, &connects),
        series: series(&i, fault),
    }
}

/// The longest time without a successful request from the fault to the
/// end of the load.
fn longest_gap(requests: &[&Event], fault: u64, load_end_ns: u64) -> u64 {
    let mut ok_ends: Vec<u64> = requests.iter().filter(|e| e.ok).map(|e| e.end_ns).collect();
    ok_ends.sort_unstable();
    let mut gap = 0u64;
    let mut prev = ok_ends
        .iter()
        .copied()
        .rfind(|&t| t <= fault)
        .unwrap_or(fault);
    for &t in ok_ends.iter().filter(|&&t| t > fault) {
        gap = gap.max(t - prev);
        prev = t;
    }
    gap.max(load_end_ns.saturating_sub(prev))
}

/// Failed requests and connects after the fault, counted by what failed.
fn failure_kinds(req_after: &[&Event], connects: &[&Event]) -> Vec<(String, usize)> {
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for e in req_after.iter().chain(connects.iter()).filter(|e| !e.ok) {
        let what = if e.kind == Kind::Request {
            "request"
        } else {
            "connect"
        };
        let detail: String = e.detail.chars().take(60).collect();
        *kinds.entry(format!("{what}: {detail}")).or_default() += 1;
    }
    kinds.into_iter().collect()
}

/// Watch streams lost after the fault and when each came back.
struct WatchRecovery {
    lost: usize,
    /// ms from the fault to each stream's return, sorted.
    back: Vec<f64>,
    never: usize,
}

/// Indexed by client first: the storm has thousands of watchers and their
/// events.
fn watch_recovery(i: &Input<'_>, fault: u64) -> WatchRecovery {
    let mut first_down = vec![None::<u64>; i.watchers];
    for e in i
        .events
        .iter()
        .filter(|e| e.kind == Kind::WatchDown && e.client < i.watchers && e.end_ns >= fault)
    {
        let d = &mut first_down[e.client];
        *d = Some(d.map_or(e.end_ns, |d| d.min(e.end_ns)));
    }
    let mut first_up_after = vec![None::<u64>; i.watchers];
    for e in i
        .events
        .iter()
        .filter(|e| e.kind == Kind::WatchUp && e.ok && e.client < i.watchers)
    {
        let Some(down) = first_down[e.client] else {
            continue;
        };
        if e.end_ns >= down {
            let u = &mut first_up_after[e.client];
            *u = Some(u.map_or(e.end_ns, |u| u.min(e.end_ns)));
        }
    }
    let mut r = WatchRecovery {
        lost: 0,
        back: Vec::new(),
        never: 0,
    };
    for (down, up) in first_down.iter().zip(&first_up_after) {
        if down.is_none() {
            continue;
        }
        r.lost += 1;
        match up {
            Some(up) => r.back.push(ms(up - fault)),
            None => r.never += 1,
        }
    }
    r.back.sort_by(f64::total_cmp);
    r
}

/// ms from the fault to the first sample with the VIP on another host.
fn vip_moved(i: &Input<'_>, fault: u64) -> Option<f64> {
    i.vip_changes
        .iter()
        .find(|(t, h)| *t >= fault && h.iter().any(|&x| x != i.holder))
        .map(|(t, _)| ms(t - fault))
}

/// Time with two hosts holding the VIP (or, for the router's changes,
/// routed to), ns.
fn two_holders_ns(changes: &[(u64, Vec<usize>)], load_end_ns: u64) -> u64 {
    let mut two = 0u64;
    for (n, (t, h)) in changes.iter().enumerate() {
        if h.len() > 1 {
            let end = changes.get(n + 1).map_or(load_end_ns, |(next, _)| *next);
            two += end.saturating_sub(*t);
        }
    }
    two
}

/// Time to detect the fault, and where that figure comes from.
fn detection(
    i: &Input<'_>,
    fault: u64,
    vip_scenario: bool,
    record: Option<&lb::Failover>,
) -> (Option<f64>, String) {
    match (i.contender, vip_scenario) {
        (Contender::Bulwark | Contender::BulwarkBgp, true) => (
            record.and_then(|f| pb_ms(f.time_to_detect)),
            "bulwark failover record (last contact with the leader -> elected)".to_owned(),
        ),
        (Contender::Bulwark | Contender::BulwarkBgp, false) => (
            i.backend_verdict_ns.map(|t| ms(t.saturating_sub(fault))),
            "fault -> bulwark's leader logs a committed verdict change".to_owned(),
        ),
        (Contender::Baseline, true) => (
            i.keepalived_master_ns.map(|t| ms(t.saturating_sub(fault))),
            "fault -> keepalived logs `Entering MASTER STATE` on another host".to_owned(),
        ),
        (Contender::Baseline, false) => (
            i.backend_verdict_ns.map(|t| ms(t.saturating_sub(fault))),
            "fault -> the first HAProxy logs the server DOWN".to_owned(),
        ),
    }
}

/// The plot: rates in 250 ms buckets, time from the fault.
fn series(i: &Input<'_>, fault: u64) -> Vec<Bucket> {
    let bucket_ns = 250_000_000u64;
    let start = i.load_ready_ns;
    let n = ((i.load_end_ns.saturating_sub(start)) / bucket_ns + 1) as usize;
    let mut ok = vec![0u32; n];
    let mut failed = vec![0u32; n];
    let mut wl = vec![0u32; n];
    let slot = |t: u64| ((t.saturating_sub(start)) / bucket_ns) as usize;
    for e in i.events.iter().filter(|e| e.end_ns >= start) {
        let s = slot(e.end_ns);
        if s >= n {
            continue;
        }
        match (e.kind, e.ok) {
            (Kind::Request, true) => ok[s] += 1,
            (Kind::Request | Kind::Connect, false) => failed[s] += 1,
            (Kind::WatchDown, _) => wl[s] += 1,
            _ => {}
        }
    }
    let per_s = 1e9 / bucket_ns as f64;
    (0..n)
        .map(|k| Bucket {
            t_s: (start as f64 + (k as u64 * bucket_ns) as f64 - fault as f64) / 1e9,
            ok_rps: f64::from(ok[k]) * per_s,
            failed_rps: f64::from(failed[k]) * per_s,
            watch_lost_ps: f64::from(wl[k]) * per_s,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: Kind, client: usize, start_ms: u64, end_ms: u64, ok: bool) -> Event {
        Event {
            kind,
            client,
            start_ns: start_ms * 1_000_000,
            end_ns: end_ms * 1_000_000,
            ok,
            detail: if ok { String::new() } else { "refused".into() },
        }
    }

    #[test]
    fn gap_failures_and_watch_recovery_come_from_the_events() {
        let params = super::super::Params::new(true);
        // Watcher 0 loses its stream at 1100 ms and is back at 1900 ms;
        // requester 1 succeeds every 100 ms except between 1000 and 1600.
        let mut events = vec![
            ev(Kind::WatchUp, 0, 0, 10, true),
            ev(Kind::WatchDown, 0, 10, 1100, false),
            ev(Kind::WatchUp, 0, 1850, 1900, true),
            ev(Kind::Connect, 1, 1200, 1300, false),
            ev(Kind::Request, 1, 1300, 1400, false),
        ];
        for t in (100..=3000)
            .step_by(100)
            .filter(|t| !(1001..1600).contains(t))
        {
            events.push(ev(Kind::Request, 1, t - 5, t, true));
        }
        let r = analyse(Input {
            scenario: Scenario::LinkCut,
            contender: Contender::Baseline,
            params: &params,
            watchers: 1,
            holder: 0,
            events: &events,
            markers: vec![Marker {
                at_ns: 1_050_000_000,
                label: "cut".into(),
            }],
            load_ready_ns: 0,
            load_end_ns: 3_000_000_000,
            vip_changes: vec![
                (0, vec![0]),
                (1_500_000_000, vec![0, 1]),
                (1_700_000_000, vec![1]),
            ],
            route_changes: None,
            keepalived_master_ns: Some(1_450_000_000),
            backend_verdict_ns: None,
            failovers: Vec::new(),
        });
        assert!((r.gap_ms - 600.0).abs() < 1e-6, "{}", r.gap_ms);
        assert_eq!((r.failed_requests, r.failed_connects), (1, 1));
        assert_eq!(r.watch_streams_lost, 1);
        assert!((r.watch_all_back_ms.expect("back") - 850.0).abs() < 1e-6);
        assert!((r.vip_moved_ms.expect("moved") - 450.0).abs() < 1e-6);
        assert!((r.two_holders_ms - 200.0).abs() < 1e-6);
        assert!((r.time_to_detect_ms.expect("detect") - 400.0).abs() < 1e-6);
        assert_eq!(r.latency_before.n, 10);
        assert!((r.latency_before.p50_ms - 5.0).abs() < 1e-6);
        assert_eq!((r.route_moved_ms, r.two_routes_ms), (None, None));
    }

    #[test]
    fn the_route_moves_when_the_best_route_goes_via_another_host() {
        let params = super::super::Params::new(true);
        let r = analyse(Input {
            scenario: Scenario::LinkCut,
            contender: Contender::BulwarkBgp,
            params: &params,
            watchers: 0,
            holder: 0,
            events: &[],
            markers: vec![Marker {
                at_ns: 1_000_000_000,
                label: "cut".into(),
            }],
            load_ready_ns: 0,
            load_end_ns: 5_000_000_000,
            vip_changes: vec![(0, vec![0]), (1_600_000_000, vec![1])],
            // The new holder's route arrives at 1.5 s but the cut-off
            // holder's stays best until the hold timer drops it at 3.2 s.
            route_changes: Some(vec![
                (0, vec![0]),
                (1_500_000_000, vec![0, 1]),
                (3_200_000_000, vec![1]),
            ]),
            keepalived_master_ns: None,
            backend_verdict_ns: None,
            failovers: Vec::new(),
        });
        assert!((r.route_moved_ms.expect("moved") - 2200.0).abs() < 1e-6);
        assert!((r.two_routes_ms.expect("two routes") - 1700.0).abs() < 1e-6);
        assert!((r.vip_moved_ms.expect("bound") - 600.0).abs() < 1e-6);
        assert!(r.two_holders_ms.abs() < 1e-6);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&v, 50.0) - 50.0).abs() < 1e-9);
        assert!((percentile(&v, 99.0) - 99.0).abs() < 1e-9);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
