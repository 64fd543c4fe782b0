//! What the leader knows about each prober: its identity, the last
//! observation per (target, kind), and where its report sequence stands.
//!
//! The stream protocol (lb.proto, `ProbeReports`) is applied here and only
//! here, so the handler stays a thin loop: FULL replaces a prober's state,
//! CHANGES patches it, HEARTBEAT only proves it is alive. Sequence numbers
//! run per prober *instance* across streams, so after a reconnect or a
//! leader change the server can tell whether it holds everything the prober
//! sent; when it cannot (new instance, gap, first contact) it asks for a
//! FULL report instead of guessing.

use std::collections::BTreeMap;
use std::time::Instant;

use bulwark_api::lb::v1::{Observation, ProbeKind, ProbeReport, ProberIdentity, ReportKind};

/// Why a report was refused as malformed (INVALID_ARGUMENT on the wire).
/// Nothing of a refused report is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// `prober` is missing or has an empty node name or instance id.
    #[error("prober: node_name and instance_id are required")]
    MissingIdentity,
    /// `kind` is unset or unknown.
    #[error("kind: expected FULL, CHANGES or HEARTBEAT, got {0}")]
    BadKind(i32),
    /// A heartbeat carried observations.
    #[error("observations: a HEARTBEAT carries none, got {0}")]
    HeartbeatWithObservations(usize),
    /// An observation without a target id.
    #[error("observations[{0}].target_id: must not be empty")]
    EmptyTarget(usize),
    /// An observation with an unset or unknown probe kind.
    #[error("observations[{index}].kind: unknown probe kind {kind}")]
    BadProbeKind {
        /// Position in the report.
        index: usize,
        /// The value received.
        kind: i32,
    },
    /// The same (target, kind) twice in one report.
    #[error("observations[{index}]: duplicate observation of {target} ({kind})")]
    DuplicateObservation {
        /// Position of the second occurrence.
        index: usize,
        /// Its target.
        target: String,
        /// Its kind.
        kind: &'static str,
    },
}

/// What the server answers to an accepted (or ignored) report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportOutcome {
    /// Highest sequence accepted from this prober instance.
    pub accepted_sequence: u64,
    /// The next report must be FULL.
    pub resync_required: bool,
}

/// Observations keyed by (target id, probe kind).
pub(super) type ObservationMap = BTreeMap<(String, ProbeKind), Observation>;

/// One prober as the leader knows it.
#[derive(Debug, Clone)]
pub(super) struct ProberState {
    pub zone: String,
    pub instance_id: String,
    pub last_sequence: u64,
    /// When its last accepted report arrived (leader's monotonic clock, so
    /// the prober's clock never matters).
    pub last_report_at: Instant,
    /// The state is incomplete until a FULL report arrives.
    pub needs_full: bool,
    pub observations: ObservationMap,
}

impl ProberState {
    pub fn is_fresh(&self, now: Instant, stale_after: std::time::Duration) -> bool {
        !self.needs_full && now.saturating_duration_since(self.last_report_at) <= stale_after
    }
}

/// Checks a report's shape and returns its sender, kind and observations
/// by key.
fn parse(
    report: &ProbeReport,
) -> Result<(&ProberIdentity, ReportKind, ObservationMap), ReportError> {
    let id = report
        .prober
        .as_ref()
        .filter(|p| !p.node_name.is_empty() && !p.instance_id.is_empty())
        .ok_or(ReportError::MissingIdentity)?;
    let kind = match ReportKind::try_from(report.kind) {
        Ok(k @ (ReportKind::Full | ReportKind::Changes | ReportKind::Heartbeat)) => k,
        _ => return Err(ReportError::BadKind(report.kind)),
    };
    if kind == ReportKind::Heartbeat && !report.observations.is_empty() {
        return Err(ReportError::HeartbeatWithObservations(
            report.observations.len(),
        ));
    }
    let mut map = ObservationMap::new();
    for (index, o) in report.observations.iter().enumerate() {
        if o.target_id.is_empty() {
            return Err(ReportError::EmptyTarget(index));
        }
        let probe = match ProbeKind::try_from(o.kind) {
            Ok(ProbeKind::Unspecified) | Err(_) => {
                return Err(ReportError::BadProbeKind {
                    index,
                    kind: o.kind,
                });
            }
            Ok(k) => k,
        };
        if map
            .insert((o.target_id.clone(), probe), o.clone())
            .is_some()
        {
            return Err(ReportError::DuplicateObservation {
                index,
                target: o.target_id.clone(),
                kind: probe.as_str_name(),
            });
        }
    }
    Ok((id, kind, map))
}

/// Applies one report to the prober table.
pub(super) fn apply(
    probers: &mut BTreeMap<String, ProberState>,
    report: &ProbeReport,
    now: Instant,
) -> Result<ReportOutcome, ReportError> {
    let (id, kind, observations) = parse(report)?;
    let seq = report.sequence;
    let resync = |state: Option<&mut ProberState>| {
        let accepted_sequence = match state {
            Some(s) => {
                s.needs_full = true;
                s.last_sequence
            }
            None => 0,
        };
        ReportOutcome {
            accepted_sequence,
            resync_required: true,
        }
    };

    let state = probers.get_mut(&id.node_name);
    let same_instance = state
        .as_ref()
        .is_some_and(|s| s.instance_id == id.instance_id);

    if kind == ReportKind::Full {
        if let Some(s) = &state
            && same_instance
            && seq <= s.last_sequence
        {
            // An old FULL (a retransmission that crossed a newer report):
            // what we hold is newer.
            return Ok(ReportOutcome {
                accepted_sequence: s.last_sequence,
                resync_required: s.needs_full,
            });
        }
        probers.insert(
            id.node_name.clone(),
            ProberState {
                zone: id.zone.clone(),
                instance_id: id.instance_id.clone(),
                last_sequence: seq,
                last_report_at: now,
                needs_full: false,
                observations,
            },
        );
        return Ok(ReportOutcome {
            accepted_sequence: seq,
            resync_required: false,
        });
    }

    // CHANGES or HEARTBEAT: only meaningful on top of a complete state of
    // the same instance, in sequence.
    let Some(s) = state else {
        return Ok(resync(None));
    };
    if !same_instance || s.needs_full {
        return Ok(resync(Some(s)));
    }
    if seq <= s.last_sequence {
        // Already applied (duplicate): acknowledging again is harmless.
        return Ok(ReportOutcome {
            accepted_sequence: s.last_sequence,
            resync_required: false,
        });
    }
    if seq != s.last_sequence + 1 {
        // A report was lost in between: the state may be wrong.
        return Ok(resync(Some(s)));
    }
    s.last_sequence = seq;
    s.last_report_at = now;
    s.observations.extend(observations);
    Ok(ReportOutcome {
        accepted_sequence: seq,
        resync_required: false,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn report(instance: &str, seq: u64, kind: ReportKind, obs: &[(&str, bool)]) -> ProbeReport {
        ProbeReport {
            prober: Some(ProberIdentity {
                node_name: "p1".into(),
                zone: "a".into(),
                instance_id: instance.into(),
            }),
            sequence: seq,
            kind: kind as i32,
            observations: obs
                .iter()
                .map(|(t, ok)| Observation {
                    target_id: (*t).into(),
                    kind: ProbeKind::Readyz as i32,
                    ok: *ok,
                    ..Default::default()
                })
                .collect(),
            sent_at: None,
        }
    }

    fn ok(seq: u64) -> Result<ReportOutcome, ReportError> {
        Ok(ReportOutcome {
            accepted_sequence: seq,
            resync_required: false,
        })
    }

    fn resync(seq: u64) -> Result<ReportOutcome, ReportError> {
        Ok(ReportOutcome {
            accepted_sequence: seq,
            resync_required: true,
        })
    }

    #[test]
    fn sequence_rules() {
        let mut t = BTreeMap::new();
        let now = Instant::now();
        // First contact must be FULL.
        assert_eq!(
            apply(&mut t, &report("i1", 5, ReportKind::Heartbeat, &[]), now),
            resync(0)
        );
        assert_eq!(
            apply(
                &mut t,
                &report("i1", 6, ReportKind::Full, &[("a", true)]),
                now
            ),
            ok(6)
        );
        assert_eq!(
            apply(
                &mut t,
                &report("i1", 7, ReportKind::Changes, &[("a", false)]),
                now
            ),
            ok(7)
        );
        assert!(!t["p1"].observations[&("a".into(), ProbeKind::Readyz)].ok);
        // A duplicate is acknowledged and not re-applied.
        assert_eq!(
            apply(
                &mut t,
                &report("i1", 7, ReportKind::Changes, &[("a", true)]),
                now
            ),
            ok(7)
        );
        assert!(!t["p1"].observations[&("a".into(), ProbeKind::Readyz)].ok);
        // A gap asks for FULL, and nothing but FULL is accepted until then.
        assert_eq!(
            apply(&mut t, &report("i1", 9, ReportKind::Heartbeat, &[]), now),
            resync(7)
        );
        assert_eq!(
            apply(&mut t, &report("i1", 10, ReportKind::Heartbeat, &[]), now),
            resync(7)
        );
        assert!(!t["p1"].is_fresh(now, Duration::from_secs(3)));
        assert_eq!(
            apply(
                &mut t,
                &report("i1", 11, ReportKind::Full, &[("b", true)]),
                now
            ),
            ok(11)
        );
        // FULL replaced everything: target a is gone.
        assert_eq!(t["p1"].observations.len(), 1);
        // A restarted prober (new instance) starts over with FULL.
        assert_eq!(
            apply(&mut t, &report("i2", 1, ReportKind::Changes, &[]), now),
            resync(11)
        );
        assert_eq!(
            apply(&mut t, &report("i2", 1, ReportKind::Full, &[]), now),
            ok(1)
        );
    }

    #[test]
    fn staleness_follows_the_last_accepted_report() {
        let mut t = BTreeMap::new();
        let start = Instant::now();
        apply(&mut t, &report("i", 1, ReportKind::Full, &[]), start).unwrap();
        let stale_after = Duration::from_secs(3);
        assert!(t["p1"].is_fresh(start + Duration::from_secs(3), stale_after));
        assert!(!t["p1"].is_fresh(start + Duration::from_secs(4), stale_after));
        apply(
            &mut t,
            &report("i", 2, ReportKind::Heartbeat, &[]),
            start + Duration::from_secs(4),
        )
        .unwrap();
        assert!(t["p1"].is_fresh(start + Duration::from_secs(5), stale_after));
    }

    #[test]
    fn malformed_reports_are_refused_whole() {
        let mut t = BTreeMap::new();
        let now = Instant::now();
        let mut r = report("i", 1, ReportKind::Full, &[("a", true), ("a", false)]);
        assert!(matches!(
            apply(&mut t, &r, now),
            Err(ReportError::DuplicateObservation { index: 1, .. })
        ));
        assert!(t.is_empty());
        r.observations[1].kind = 42;
        assert_eq!(
            apply(&mut t, &r, now),
            Err(ReportError::BadProbeKind { index: 1, kind: 42 })
        );
        r.observations[1].kind = ProbeKind::Livez as i32;
        r.observations[0].target_id.clear();
        assert_eq!(apply(&mut t, &r, now), Err(ReportError::EmptyTarget(0)));
        let hb = report("i", 1, ReportKind::Heartbeat, &[("a", true)]);
        assert_eq!(
            apply(&mut t, &hb, now),
            Err(ReportError::HeartbeatWithObservations(1))
        );
        let mut bad = report("i", 1, ReportKind::Full, &[]);
        bad.kind = 0;
        assert_eq!(apply(&mut t, &bad, now), Err(ReportError::BadKind(0)));
        bad.prober = None;
        assert_eq!(apply(&mut t, &bad, now), Err(ReportError::MissingIdentity));
        assert!(t.is_empty());
    }
}
