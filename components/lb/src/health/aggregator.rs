//! [`HealthAggregator`]: the leader's running picture of every prober's
//! observations, turned into verdict *changes* to commit.
//!
//! It is fed three things — the backend registry (as committed), probers'
//! reports (as they arrive) and the time — and does no I/O, so the Raft
//! wiring, the gRPC handler and the tests drive it the same way. Verdicts
//! are recomputed from scratch on every [`HealthAggregator::evaluate`]
//! (there is no hidden history besides the current verdicts), which is what
//! makes the output a pure function of the inputs and lets an evaluation
//! that changes nothing emit nothing.
//!
//! A new leader starts with the committed verdicts and no reports at all.
//! Evaluating at once would turn every backend Unknown for lack of votes, so
//! [`HealthAggregator::evaluate`] emits nothing until `staleAfter` has
//! passed since the aggregator was created: every live prober reconnects
//! and sends its FULL report within that time (else it would be stale
//! anyway), and the committed verdicts stand meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bulwark_api::lb::v1::{Observation, ProbeKind, ProbeReport};

use super::config::HealthConfig;
use super::probers::{self, ProberState, ReportError, ReportOutcome};
use super::votes::{self, Decision, Probes, View, ZoneTally};
use crate::backends::{BackendSpec, Verdict};

/// A verdict to commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerdictChange {
    /// The backend.
    pub backend_id: String,
    /// Its verdict until now.
    pub from: Verdict,
    /// Its new verdict.
    pub to: Verdict,
    /// Why, in one line.
    pub reason: String,
}

/// A prober whose standing changed: it stopped or started counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProberChange {
    /// The prober's node name.
    pub node_name: String,
    /// Its zone.
    pub zone: String,
    /// Sees everything down while others see things up.
    pub isolated: bool,
    /// Silent for longer than `staleAfter` (or waiting for a FULL report).
    pub stale: bool,
}

/// What one [`HealthAggregator::evaluate`] found changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evaluation {
    /// Verdicts to commit, sorted by backend id.
    pub verdicts: Vec<VerdictChange>,
    /// Probers that became (or stopped being) isolated or stale, by name.
    pub probers: Vec<ProberChange>,
}

impl Evaluation {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.verdicts.is_empty() && self.probers.is_empty()
    }
}

/// One zone's votes on one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneVotes {
    /// The zone.
    pub zone: String,
    /// The counted votes.
    pub tally: ZoneTally,
    /// The zone's combined view; `None` when no counted prober has one.
    pub view: Option<View>,
}

/// One prober's latest observations of one backend.
#[derive(Clone, Debug, PartialEq)]
pub struct ProberView {
    /// The prober's node name.
    pub node_name: String,
    /// Its zone.
    pub zone: String,
    /// Whether its vote counts (fresh and not isolated).
    pub counted: bool,
    /// Its view, from the observations below.
    pub view: Option<View>,
    /// Latest readyz/livez/tcp observations, by kind.
    pub latest: Vec<Observation>,
}

/// Aggregated health of one backend.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendHealth {
    /// Backend id.
    pub id: String,
    /// host:port.
    pub address: String,
    /// Its zone.
    pub zone: String,
    /// The current verdict (committed, or emitted for commit).
    pub verdict: Verdict,
    /// Why.
    pub reason: String,
    /// Votes per zone, sorted by zone.
    pub zones: Vec<ZoneVotes>,
    /// Every prober's view, sorted by name.
    pub probers: Vec<ProberView>,
}

/// One prober's standing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProberStatus {
    /// Node name.
    pub node_name: String,
    /// Zone.
    pub zone: String,
    /// Sees everything down while others see things up: ignored.
    pub isolated: bool,
    /// Silent too long (or waiting for FULL): ignored.
    pub stale: bool,
    /// Time since its last accepted report.
    pub last_report_age: Duration,
    /// Sequence number of its last accepted report.
    pub last_sequence: u64,
}

/// Everything GetHealth shows.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthStatus {
    /// Per backend, sorted by id.
    pub backends: Vec<BackendHealth>,
    /// Per prober, sorted by name.
    pub probers: Vec<ProberStatus>,
    /// See [`fail_open`].
    pub fail_open: bool,
    /// See [`zones_down`].
    pub zones_down: Vec<String>,
}

/// Every admin-active backend has a non-routable verdict (and there is at
/// least one): the proxy then routes to all of them (Envoy's panic mode),
/// and this is the alert. Same condition as the proxy's fail-open tier.
pub fn fail_open(backends: &[BackendSpec]) -> bool {
    fail_open_of(backends.iter().map(|b| (!b.admin.is_drain(), b.verdict)))
}

/// Zones (named ones only) none of whose backends is routable by verdict,
/// sorted. Zone-aware proxies spill over for them anyway; this is for status
/// and alerts.
pub fn zones_down(backends: &[BackendSpec]) -> Vec<String> {
    zones_down_of(backends.iter().map(|b| (b.zone.as_str(), b.verdict)))
}

fn fail_open_of(backends: impl Iterator<Item = (bool, Verdict)>) -> bool {
    let mut any_active = false;
    for (active, verdict) in backends {
        if active {
            any_active = true;
            if verdict.is_routable() {
                return false;
            }
        }
    }
    any_active
}

fn zones_down_of<'a>(backends: impl Iterator<Item = (&'a str, Verdict)>) -> Vec<String> {
    let mut up: BTreeMap<&str, bool> = BTreeMap::new();
    for (zone, verdict) in backends {
        if !zone.is_empty() {
            *up.entry(zone).or_default() |= verdict.is_routable();
        }
    }
    up.into_iter()
        .filter(|(_, any_up)| !any_up)
        .map(|(z, _)| z.to_owned())
        .collect()
}

#[derive(Clone, Debug)]
struct Tracked {
    address: String,
    zone: String,
    active: bool,
    verdict: Verdict,
    reason: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Standing {
    fresh: bool,
    isolated: bool,
}

impl Standing {
    fn counted(self) -> bool {
        self.fresh && !self.isolated
    }
}

/// The result of one pass over the current inputs.
struct Assessment<'a> {
    standing: BTreeMap<&'a str, Standing>,
    /// Per prober, per backend id: what it probed.
    probes: BTreeMap<&'a str, HashMap<&'a str, Probes<'a>>>,
    /// Per backend id: tallies by zone and the decision.
    backends: BTreeMap<&'a str, (BTreeMap<String, ZoneTally>, Decision)>,
}

/// The leader's health aggregation. See the module docs.
#[derive(Debug)]
pub struct HealthAggregator {
    config: HealthConfig,
    backends: BTreeMap<String, Tracked>,
    probers: BTreeMap<String, ProberState>,
    /// Standing as of the last evaluate, to report changes only.
    isolated: BTreeSet<String>,
    stale: BTreeSet<String>,
    /// No verdicts are emitted before this (see the module docs).
    warm_until: Instant,
}

impl HealthAggregator {
    /// An aggregator with no backends and no probers, on a node that
    /// became leader at `now`.
    pub fn new(config: HealthConfig, now: Instant) -> Self {
        Self {
            warm_until: now + config.stale_after,
            config,
            backends: BTreeMap::new(),
            probers: BTreeMap::new(),
            isolated: BTreeSet::new(),
            stale: BTreeSet::new(),
        }
    }

    /// Whether probers have had time to report since the start, so
    /// evaluations emit changes.
    pub fn is_warm(&self, now: Instant) -> bool {
        now >= self.warm_until
    }

    /// The rules in force.
    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// Takes the committed registry. Backends new to the aggregator start
    /// from their committed verdict; known ones keep the aggregator's (which
    /// is ahead of the registry while a change is being committed); removed
    /// ones are forgotten.
    pub fn set_backends(&mut self, specs: &[BackendSpec]) {
        let mut next = BTreeMap::new();
        for spec in specs {
            let tracked = match self.backends.remove(&spec.id) {
                Some(mut t) => {
                    t.address = spec.address.to_string();
                    t.zone.clone_from(&spec.zone);
                    t.active = !spec.admin.is_drain();
                    t
                }
                None => Tracked {
                    address: spec.address.to_string(),
                    zone: spec.zone.clone(),
                    active: !spec.admin.is_drain(),
                    verdict: spec.verdict,
                    reason: "as committed".to_owned(),
                },
            };
            next.insert(spec.id.clone(), tracked);
        }
        self.backends = next;
    }

    /// Applies one prober report (see [`super::probers`] for the sequence
    /// rules). `now` is the arrival time on the leader's monotonic clock.
    pub fn report(
        &mut self,
        report: &ProbeReport,
        now: Instant,
    ) -> Result<ReportOutcome, ReportError> {
        probers::apply(&mut self.probers, report, now)
    }

    /// Recomputes every verdict and returns what changed since the last
    /// call (or since the registry was taken). The returned verdicts are
    /// considered current from now on: commit them. Empty while not warm.
    pub fn evaluate(&mut self, now: Instant) -> Evaluation {
        if !self.is_warm(now) {
            return Evaluation::default();
        }
        let (decisions, isolated, stale) = {
            let a = self.assess(now);
            let decisions: Vec<(String, Decision)> = a
                .backends
                .into_iter()
                .map(|(id, (_, d))| (id.to_owned(), d))
                .collect();
            let isolated: BTreeSet<String> = a
                .standing
                .iter()
                .filter(|(_, s)| s.isolated)
                .map(|(n, _)| (*n).to_owned())
                .collect();
            let stale: BTreeSet<String> = a
                .standing
                .iter()
                .filter(|(_, s)| !s.fresh)
                .map(|(n, _)| (*n).to_owned())
                .collect();
            (decisions, isolated, stale)
        };

        let mut out = Evaluation::default();
        for (id, decision) in decisions {
            let Some(t) = self.backends.get_mut(&id) else {
                continue;
            };
            if t.verdict != decision.verdict {
                out.verdicts.push(VerdictChange {
                    backend_id: id,
                    from: t.verdict,
                    to: decision.verdict,
                    reason: decision.reason.clone(),
                });
                t.verdict = decision.verdict;
            }
            t.reason = decision.reason;
        }
        let changed: BTreeSet<&String> = isolated
            .symmetric_difference(&self.isolated)
            .chain(stale.symmetric_difference(&self.stale))
            .collect();
        for name in changed {
            let zone = self
                .probers
                .get(name)
                .map(|p| p.zone.clone())
                .unwrap_or_default();
            out.probers.push(ProberChange {
                node_name: name.clone(),
                zone,
                isolated: isolated.contains(name),
                stale: stale.contains(name),
            });
        }
        self.isolated = isolated;
        self.stale = stale;
        out
    }

    /// The current verdict of a backend.
    pub fn verdict(&self, backend_id: &str) -> Option<Verdict> {
        self.backends.get(backend_id).map(|t| t.verdict)
    }

    /// Every tracked backend's current verdict and its latest reason, by
    /// id: what the leader makes the committed verdicts agree with.
    pub fn verdicts(&self) -> impl Iterator<Item = (&str, Verdict, &str)> {
        self.backends
            .iter()
            .map(|(id, t)| (id.as_str(), t.verdict, t.reason.as_str()))
    }

    /// See [`fail_open`], over the current verdicts.
    pub fn fail_open(&self) -> bool {
        fail_open_of(self.backends.values().map(|t| (t.active, t.verdict)))
    }

    /// See [`zones_down`], over the current verdicts.
    pub fn zones_down(&self) -> Vec<String> {
        zones_down_of(self.backends.values().map(|t| (t.zone.as_str(), t.verdict)))
    }

    /// The full picture for GetHealth. The verdicts are the current ones;
    /// the votes are as of `now`.
    pub fn status(&self, now: Instant) -> HealthStatus {
        let a = self.assess(now);
        let backends = self
            .backends
            .iter()
            .map(|(id, t)| {
                let zones = a
                    .backends
                    .get(id.as_str())
                    .map(|(zones, _)| {
                        zones
                            .iter()
                            .map(|(zone, tally)| ZoneVotes {
                                zone: zone.clone(),
                                view: tally.view(),
                                tally: tally.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let probers = a
                    .probes
                    .iter()
                    .filter_map(|(name, by_target)| {
                        let p = by_target.get(id.as_str())?;
                        let latest = [p.readyz, p.livez, p.tcp]
                            .into_iter()
                            .flatten()
                            .cloned()
                            .collect();
                        Some(ProberView {
                            node_name: (*name).to_owned(),
                            zone: self.probers[*name].zone.clone(),
                            counted: a.standing[name].counted(),
                            view: p.view(),
                            latest,
                        })
                    })
                    .collect();
                BackendHealth {
                    id: id.clone(),
                    address: t.address.clone(),
                    zone: t.zone.clone(),
                    verdict: t.verdict,
                    reason: t.reason.clone(),
                    zones,
                    probers,
                }
            })
            .collect();
        let probers = self
            .probers
            .iter()
            .map(|(name, p)| {
                let s = a.standing[name.as_str()];
                ProberStatus {
                    node_name: name.clone(),
                    zone: p.zone.clone(),
                    isolated: s.isolated,
                    stale: !s.fresh,
                    last_report_age: now.saturating_duration_since(p.last_report_at),
                    last_sequence: p.last_sequence,
                }
            })
            .collect();
        HealthStatus {
            backends,
            probers,
            fail_open: self.fail_open(),
            zones_down: self.zones_down(),
        }
    }

    fn assess(&self, now: Instant) -> Assessment<'_> {
        // What each prober probed, per registered backend.
        let mut probes: BTreeMap<&str, HashMap<&str, Probes<'_>>> = BTreeMap::new();
        for (name, p) in &self.probers {
            let mut by_target: HashMap<&str, Probes<'_>> = HashMap::new();
            for ((target, kind), o) in &p.observations {
                if *kind != ProbeKind::Etcd && self.backends.contains_key(target) {
                    by_target.entry(target.as_str()).or_default().add(*kind, o);
                }
            }
            probes.insert(name.as_str(), by_target);
        }

        // Isolation: a fresh prober whose every view is Down while another
        // fresh prober reaches something alive. The other prober is by
        // construction not all-down, so the rule cannot chase its tail.
        let fresh = |name: &str| self.probers[name].is_fresh(now, self.config.stale_after);
        let all_down = |by_target: &HashMap<&str, Probes<'_>>| {
            let mut views = by_target.values().filter_map(Probes::view).peekable();
            views.peek().is_some() && views.all(|v| v == View::Down)
        };
        let reaches_alive = |by_target: &HashMap<&str, Probes<'_>>| {
            by_target
                .values()
                .filter_map(Probes::view)
                .any(|v| v != View::Down)
        };
        let someone_reaches_alive = probes
            .iter()
            .any(|(name, by_target)| fresh(name) && reaches_alive(by_target));
        let standing: BTreeMap<&str, Standing> = probes
            .iter()
            .map(|(name, by_target)| {
                let fresh = fresh(name);
                let isolated = fresh && someone_reaches_alive && all_down(by_target);
                (*name, Standing { fresh, isolated })
            })
            .collect();

        // Tallies and decisions per backend.
        let mut backends = BTreeMap::new();
        for id in self.backends.keys() {
            let mut zones: BTreeMap<String, ZoneTally> = BTreeMap::new();
            let mut down_labels: BTreeMap<String, u32> = BTreeMap::new();
            let mut bad_labels: BTreeMap<String, u32> = BTreeMap::new();
            for (name, by_target) in &probes {
                let Some(p) = by_target.get(id.as_str()) else {
                    continue;
                };
                let Some(view) = p.view() else { continue };
                let tally = zones.entry(self.probers[*name].zone.clone()).or_default();
                if !standing[name].counted() {
                    tally.ignored += 1;
                    continue;
                }
                tally.count(view);
                if view != View::Up
                    && let Some(o) = p.culprit()
                {
                    let label = votes::failure_label(o);
                    if view == View::Down {
                        *down_labels.entry(label.clone()).or_default() += 1;
                    }
                    *bad_labels.entry(label).or_default() += 1;
                }
            }
            let decision = votes::decide(
                &zones,
                &self.config,
                most_common(&down_labels),
                most_common(&bad_labels),
            );
            backends.insert(id.as_str(), (zones, decision));
        }
        Assessment {
            standing,
            probes,
            backends,
        }
    }
}

/// The most frequent label; ties go to the first in order, so the reason
/// text is deterministic.
fn most_common(labels: &BTreeMap<String, u32>) -> Option<String> {
    let mut best: Option<(&String, u32)> = None;
    for (label, n) in labels {
        if best.is_none_or(|(_, m)| *n > m) {
            best = Some((label, *n));
        }
    }
    best.map(|(l, _)| l.clone())
}
