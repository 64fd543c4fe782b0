//! The [`HealthAggregator`] at work on the Raft leader: fed by the
//! `ProbeReports` streams and the committed registry, and turned into
//! `ApplyVerdicts` commands.
//!
//! Only the leader aggregates. When a node becomes leader it starts a fresh
//! aggregator from the committed registry and verdicts (probers reconnect
//! and send FULL reports; the aggregator emits nothing until `staleAfter`
//! has passed, so committed verdicts stand until fresh evidence changes
//! them). When it stops leading, the aggregator is dropped and every open
//! report stream is told where the leader went.
//!
//! Committing is a reconciliation, not a queue: after each report (and on a
//! timer, for staleness) one task evaluates, then compares the aggregator's
//! verdicts with the committed ones and proposes the differences in one
//! command. One proposal is in flight at a time, and a proposal that fails
//! (no quorum for a moment) is simply found again on the next pass, so a
//! verdict change is never lost and an unchanged verdict is never written.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bulwark_api::lb::v1::{ProbeReport, ReportKind};
use bulwark_api::raft::v1 as pb;
use bulwark_common::workers::Worker;
use openraft::async_runtime::WatchReceiver;
use openraft::type_config::alias::WatchReceiverOf;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{HealthAggregator, HealthConfig, HealthStatus, ReportError, ReportOutcome};
use crate::backends::{BackendSpec, Verdict};
use crate::raft::state::{LbState, command};
use crate::raft::store::StateMachineStore;
use crate::raft::{NodeId, Raft, ServerMetrics, TypeConfig, server_leads};

/// How often the leader re-evaluates without a report (staleness, the end
/// of the warm-up).
const TICK: Duration = Duration::from_millis(200);
/// How long one proposal may take before the next pass tries again.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(2);

/// The leader's health aggregation, shared by the report streams, GetHealth
/// and the committing task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HealthService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: HealthConfig,
    /// `Some` while this node leads.
    aggregator: Mutex<Option<HealthAggregator>>,
    /// A report arrived: evaluate now.
    wake: Notify,
    /// Bumped whenever leadership starts or ends on this node, so report
    /// streams opened under the previous leadership end.
    epoch: watch::Sender<u64>,
}

impl HealthService {
    /// A service that aggregates once this node leads.
    pub fn new(config: HealthConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                aggregator: Mutex::new(None),
                wake: Notify::new(),
                epoch: watch::Sender::new(0),
            }),
        }
    }

    /// The rules in force.
    pub fn config(&self) -> &HealthConfig {
        &self.inner.config
    }

    fn lock(&self) -> MutexGuard<'_, Option<HealthAggregator>> {
        // The aggregator is plain data; a panic elsewhere cannot leave it
        // half-updated in a way that matters more than losing the process.
        self.inner
            .aggregator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this node aggregates now (it leads).
    pub fn is_leading(&self) -> bool {
        self.lock().is_some()
    }

    /// Changes whenever leadership starts or ends here.
    pub fn leadership(&self) -> watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    /// Applies one prober report. `Ok(None)`: this node does not aggregate
    /// (not the leader); the caller sends a leader hint.
    pub fn report(&self, report: &ProbeReport) -> Result<Option<ReportOutcome>, ReportError> {
        let outcome = {
            let mut guard = self.lock();
            let Some(agg) = guard.as_mut() else {
                return Ok(None);
            };
            agg.report(report, Instant::now())?
        };
        let kind = ReportKind::try_from(report.kind)
            .map_or("unknown", |k| k.as_str_name())
            .trim_start_matches("REPORT_KIND_")
            .to_ascii_lowercase();
        metrics::counter!("bulwark_lb_probe_reports_total", "kind" => kind).increment(1);
        self.inner.wake.notify_one();
        Ok(Some(outcome))
    }

    /// Everything GetHealth shows; `None` when not leading.
    pub fn status(&self) -> Option<HealthStatus> {
        self.lock().as_ref().map(|a| a.status(Instant::now()))
    }

    /// Runs on every node: aggregates while this node leads, and commits
    /// verdict changes.
    pub async fn run(
        self,
        raft: Raft,
        sm: StateMachineStore,
        node_id: NodeId,
        token: CancellationToken,
        worker: Worker,
    ) -> anyhow::Result<()> {
        let mut metrics_rx = raft.server_metrics();
        let mut state_rx = sm.subscribe();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let leading = server_leads(&metrics_rx.borrow_watched(), node_id);
            let state = state_rx.borrow_and_update().clone();
            self.follow_leadership(leading, &state);
            worker.set_state(if leading { "leading" } else { "following" });
            if leading {
                worker.record(&self.reconcile(&raft, &state).await);
            }
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                alive = leadership_flip(&mut metrics_rx, node_id, leading) => if !alive { return Ok(()) },
                r = state_rx.changed() => if r.is_err() { return Ok(()) },
                () = self.inner.wake.notified() => {}
                _ = tick.tick() => {}
            }
        }
    }

    /// Starts or drops the aggregator as leadership comes and goes, and
    /// keeps its registry in step with the committed one.
    fn follow_leadership(&self, leading: bool, state: &LbState) {
        let mut guard = self.lock();
        match (guard.as_mut(), leading) {
            (None, true) => {
                let mut agg = HealthAggregator::new(self.inner.config.clone(), Instant::now());
                agg.set_backends(&state.backend_specs());
                *guard = Some(agg);
                drop(guard);
                self.inner.epoch.send_modify(|e| *e += 1);
                tracing::info!(
                    warm_up = ?self.inner.config.stale_after,
                    "leading: health aggregation started; committed verdicts stand until probers have reported"
                );
            }
            (Some(_), false) => {
                *guard = None;
                drop(guard);
                self.inner.epoch.send_modify(|e| *e += 1);
                set_prober_gauges(None);
                tracing::info!("no longer leading: health aggregation stopped");
            }
            (Some(agg), true) => agg.set_backends(&state.backend_specs()),
            (None, false) => {}
        }
    }

    /// Evaluates, then proposes whatever differs from the committed state.
    /// `Ok` when the committed verdicts agree with the aggregator's now;
    /// the error says why a proposal did not commit.
    async fn reconcile(&self, raft: &Raft, state: &LbState) -> Result<(), String> {
        let Some(cmd) = self.evaluate(state) else {
            return Ok(());
        };
        let changes = cmd.changes.clone();
        let fail_open = cmd.fail_open;
        let c = command(SystemTime::now(), pb::command::Command::ApplyVerdicts(cmd));
        match tokio::time::timeout(COMMIT_TIMEOUT, raft.client_write(c)).await {
            Err(_) => {
                tracing::warn!("verdict changes not committed within {COMMIT_TIMEOUT:?}; retrying");
                Err(format!(
                    "verdict changes not committed within {COMMIT_TIMEOUT:?}"
                ))
            }
            Ok(Ok(resp)) => {
                for ch in &changes {
                    let to = verdict_of_pb(ch.verdict);
                    metrics::counter!("bulwark_lb_verdict_changes_total", "to" => verdict_label(to))
                        .increment(1);
                    tracing::info!(
                        backend = %ch.backend_id,
                        verdict = verdict_label(to),
                        reason = %ch.reason,
                        index = resp.log_id.index,
                        "verdict committed"
                    );
                }
                if fail_open {
                    tracing::error!(
                        index = resp.log_id.index,
                        "ALERT fail-open: every backend looks down to the probers; routing to all of them"
                    );
                }
                Ok(())
            }
            // Not committed: the next pass (report or tick) finds the same
            // difference and proposes again, or leadership is gone and the
            // aggregator with it.
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "verdict changes not committed; retrying");
                Err(format!("verdict changes not committed: {e}"))
            }
        }
    }

    /// The command that makes the committed verdicts agree with the
    /// aggregator's; `None` when they already do.
    fn evaluate(&self, state: &LbState) -> Option<pb::ApplyVerdicts> {
        let now = Instant::now();
        let mut guard = self.lock();
        let agg = guard.as_mut()?;
        let evaluation = agg.evaluate(now);
        for p in &evaluation.probers {
            if p.isolated {
                tracing::warn!(prober = %p.node_name, zone = %p.zone, "prober isolated: it sees every backend down while others do not; its votes are ignored");
            } else if p.stale {
                tracing::warn!(prober = %p.node_name, zone = %p.zone, "prober stale: no report within staleAfter; its votes are ignored");
            } else {
                tracing::info!(prober = %p.node_name, zone = %p.zone, "prober counted again");
            }
        }
        set_prober_gauges(Some(&agg.status(now)));

        let committed: std::collections::HashMap<String, Verdict> = state
            .backend_specs()
            .into_iter()
            .map(|b: BackendSpec| (b.id, b.verdict))
            .collect();
        let changes: Vec<pb::VerdictRecord> = agg
            .verdicts()
            .filter(|(id, v, _)| committed.get(*id).is_some_and(|c| c != v))
            .map(|(id, v, reason)| pb::VerdictRecord {
                backend_id: id.to_owned(),
                verdict: verdict_to_pb(v) as i32,
                reason: reason.to_owned(),
                since: None,
            })
            .collect();
        let fail_open = agg.fail_open();
        let zones_down = agg.zones_down();
        let data = state.data();
        if changes.is_empty() && fail_open == data.fail_open && zones_down == data.zones_down {
            return None;
        }
        Some(pb::ApplyVerdicts {
            changes,
            fail_open,
            zones_down,
        })
    }
}

/// Resolves when `node_id` starts or stops leading; `false` once Raft is
/// gone. Only leadership matters to the loop: waking on every change of
/// Raft's full metrics (one per message its core handles) made a leader
/// cut off from its followers retry its refused verdict write in a loop,
/// each refusal itself a metrics change (both cores busy, a warning per
/// try, 7,500 a second in the reconnect-storm bench), and woke every
/// follower on each heartbeat. It follows the server metrics (role, leader,
/// vote, membership), and of those only a change of leadership ends it.
/// Reports, state changes and the tick still wake the loop, so a refused
/// write is retried at their pace.
async fn leadership_flip(
    rx: &mut WatchReceiverOf<TypeConfig, ServerMetrics>,
    node_id: NodeId,
    was: bool,
) -> bool {
    loop {
        if rx.changed().await.is_err() {
            return false;
        }
        if server_leads(&rx.borrow_watched(), node_id) != was {
            return true;
        }
    }
}

fn set_prober_gauges(status: Option<&HealthStatus>) {
    let (total, isolated, stale) = status.map_or((0, 0, 0), |s| {
        (
            s.probers.len(),
            s.probers.iter().filter(|p| p.isolated).count(),
            s.probers.iter().filter(|p| p.stale).count(),
        )
    });
    metrics::gauge!("bulwark_lb_probers").set(total as f64);
    metrics::gauge!("bulwark_lb_probers_isolated").set(isolated as f64);
    metrics::gauge!("bulwark_lb_probers_stale").set(stale as f64);
}

/// The persisted form of a verdict.
pub fn verdict_to_pb(v: Verdict) -> pb::Verdict {
    match v {
        Verdict::Healthy => pb::Verdict::Up,
        Verdict::Draining => pb::Verdict::NotReady,
        Verdict::Down => pb::Verdict::Down,
        Verdict::Unknown => pb::Verdict::Unknown,
    }
}

fn verdict_of_pb(v: i32) -> Verdict {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Up) => Verdict::Healthy,
        Ok(pb::Verdict::NotReady) => Verdict::Draining,
        Ok(pb::Verdict::Down) => Verdict::Down,
        _ => Verdict::Unknown,
    }
}

/// Every verdict, in the order metrics list them.
const ALL_VERDICTS: [Verdict; 4] = [
    Verdict::Healthy,
    Verdict::Draining,
    Verdict::Down,
    Verdict::Unknown,
];

/// The label of a verdict in metrics and logs.
pub const fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::Healthy => "up",
        Verdict::Draining => "not_ready",
        Verdict::Down => "down",
        Verdict::Unknown => "unknown",
    }
}

/// Every value [`verdict_label`] returns.
pub const VERDICT_LABELS: &[&str] = &[
    verdict_label(ALL_VERDICTS[0]),
    verdict_label(ALL_VERDICTS[1]),
    verdict_label(ALL_VERDICTS[2]),
    verdict_label(ALL_VERDICTS[3]),
];

/// Exports the committed health of `state` (every node): one
/// `bulwark_lb_backend_verdict{backend,verdict}` series per backend and
/// verdict (1 for the current one) and the zones down. Fail-open is
/// exported once, by the data path (`bulwark_lb_fail_open`), where it
/// takes effect.
pub fn export_committed(state: &LbState) {
    for b in state.backend_specs() {
        for v in ALL_VERDICTS {
            metrics::gauge!("bulwark_lb_backend_verdict", "backend" => b.id.clone(), "verdict" => verdict_label(v))
                .set(f64::from(u8::from(b.verdict == v)));
        }
    }
    let data = state.data();
    metrics::gauge!("bulwark_lb_zones_down").set(data.zones_down.len() as f64);
}

#[cfg(test)]
mod tests {
    use bulwark_api::lb::v1::{Observation, ProbeKind, ProbeReason, ProberIdentity};
    use openraft::vote::RaftLeaderId;

    use super::*;

    /// Only a change of leadership ends the wait: the server metrics'
    /// other changes (vote, membership) do not.
    #[tokio::test(start_paused = true)]
    async fn only_a_change_of_leadership_ends_the_wait() {
        use openraft::async_runtime::watch::{Watch as _, WatchSender as _};
        use openraft::type_config::alias::WatchOf;

        let mut m = ServerMetrics {
            id: 1,
            vote: crate::raft::types::Vote::new_committed(1, 1),
            state: openraft::ServerState::Leader,
            current_leader: Some(1),
            membership_config: Default::default(),
            committed_membership_config: Default::default(),
        };
        let (tx, mut rx) = WatchOf::<TypeConfig>::channel(m.clone());
        {
            let wait = leadership_flip(&mut rx, 1, true);
            tokio::pin!(wait);
            for i in 0..20 {
                m.vote = crate::raft::types::Vote::new_committed(i + 1, 1);
                tx.send(m.clone()).unwrap();
                let woke = tokio::time::timeout(Duration::from_millis(5), &mut wait).await;
                assert!(woke.is_err(), "woke on a change that kept the leader: {i}");
            }
            m.state = openraft::ServerState::Follower;
            m.current_leader = Some(2);
            tx.send(m).unwrap();
            assert!(wait.await, "stepping down ends the wait");
        }

        let gone = leadership_flip(&mut rx, 1, false);
        drop(tx);
        assert!(!gone.await, "Raft gone: false");
    }
    use crate::raft::types::{Entry, LeaderId, LogId};

    fn apply(state: &mut LbState, index: u64, c: pb::command::Command) {
        let entry = Entry {
            log_id: LogId::new(LeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Normal(command(SystemTime::UNIX_EPOCH, c)),
        };
        state.apply(&entry).unwrap();
    }

    fn registry() -> LbState {
        let mut s = LbState::default();
        let backends = ["cp-1", "cp-2"]
            .iter()
            .zip(["a", "b"])
            .map(|(id, zone)| pb::BackendRecord {
                id: (*id).into(),
                address: "10.0.0.1:6443".into(),
                zone: zone.into(),
                weight: 100,
                admin_state: pb::AdminState::Active as i32,
                drain_deadline: None,
            })
            .collect();
        apply(
            &mut s,
            1,
            pb::command::Command::SeedBackends(pb::SeedBackends { backends }),
        );
        s
    }

    fn full(prober: &str, zone: &str, cp1_ok: bool) -> ProbeReport {
        let obs = |target: &str, kind: ProbeKind, ok: bool| Observation {
            target_id: target.into(),
            kind: kind as i32,
            ok,
            reason: if ok {
                ProbeReason::Ok
            } else {
                ProbeReason::ConnectionRefused
            } as i32,
            ..Default::default()
        };
        ProbeReport {
            prober: Some(ProberIdentity {
                node_name: prober.into(),
                zone: zone.into(),
                instance_id: format!("{prober}-1"),
            }),
            sequence: 1,
            kind: ReportKind::Full as i32,
            observations: vec![
                obs("cp-1", ProbeKind::Readyz, cp1_ok),
                obs("cp-1", ProbeKind::Livez, cp1_ok),
                obs("cp-2", ProbeKind::Readyz, true),
                obs("cp-2", ProbeKind::Livez, true),
            ],
            sent_at: None,
        }
    }

    fn config() -> HealthConfig {
        HealthConfig {
            heartbeat_interval: Duration::from_millis(100),
            stale_after: Duration::from_millis(200),
            ..HealthConfig::default()
        }
    }

    #[test]
    fn only_a_leader_takes_reports() {
        let s = HealthService::new(config());
        assert_eq!(s.report(&full("p-a", "a", true)), Ok(None));
        assert!(s.status().is_none());
        let epoch = s.leadership();
        s.follow_leadership(true, &registry());
        assert!(epoch.has_changed().unwrap(), "streams learn of the change");
        assert!(s.report(&full("p-a", "a", true)).unwrap().is_some());
        s.follow_leadership(false, &registry());
        assert!(!s.is_leading());
        assert_eq!(s.report(&full("p-a", "a", true)), Ok(None));
    }

    #[test]
    fn commits_changes_only_and_keeps_committed_verdicts_while_warming_up() {
        let mut state = registry();
        let s = HealthService::new(config());
        s.follow_leadership(true, &state);
        for (p, z) in [("p-a", "a"), ("p-b", "b")] {
            s.report(&full(p, z, false)).unwrap();
        }
        // Warming up: the committed (Unknown) verdicts stand.
        assert_eq!(s.evaluate(&state), None);

        std::thread::sleep(Duration::from_millis(250));
        for (p, z) in [("p-a", "a"), ("p-b", "b")] {
            let mut r = full(p, z, false);
            r.sequence = 2;
            r.kind = ReportKind::Heartbeat as i32;
            r.observations.clear();
            s.report(&r).unwrap();
        }
        let cmd = s.evaluate(&state).expect("cp-1 down, cp-2 up");
        let got: Vec<(&str, i32)> = cmd
            .changes
            .iter()
            .map(|c| (c.backend_id.as_str(), c.verdict))
            .collect();
        assert_eq!(
            got,
            [
                ("cp-1", pb::Verdict::Down as i32),
                ("cp-2", pb::Verdict::Up as i32)
            ]
        );
        assert_eq!(cmd.zones_down, ["a"]);
        assert!(!cmd.fail_open);

        // Not committed yet: the same difference is proposed again.
        assert_eq!(s.evaluate(&state).map(|c| c.changes.len()), Some(2));
        // Committed: nothing more to propose.
        apply(&mut state, 2, pb::command::Command::ApplyVerdicts(cmd));
        assert_eq!(s.evaluate(&state), None);
        assert_eq!(
            state.backend_specs()[0].verdict,
            Verdict::Down,
            "as committed"
        );
    }
}
