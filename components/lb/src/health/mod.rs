//! Who decides a backend is down: aggregation of many probers' observations
//! into one verdict per backend.
//!
//! Probers in several zones report what they see (`ProbeReports` stream);
//! the Raft leader feeds the reports into a [`HealthAggregator`] together
//! with the committed backend registry and commits only the verdict
//! *changes* it emits, so every LB node routes by the same verdicts and the
//! log grows with events, not with reports. The rules (votes.rs):
//!
//! - a backend is Down only when probers in a quorum of the reporting zones
//!   agree, and never on one prober's word (`minVotes`);
//! - `/readyz` failing while the apiserver is alive (graceful shutdown) is
//!   Draining: no new connections, existing ones finish;
//! - a prober that sees every backend down while others reach something is
//!   isolated (it is probably the one cut off) and does not count; neither
//!   does a stale one (silent for `staleAfter`);
//! - without agreement the verdict is Unknown, which routes;
//! - when every backend is down the proxy fails open and [`fail_open`]
//!   raises the alert; a zone whose backends are all down is reported by
//!   [`zones_down`].
//!
//! The aggregator is pure logic: no I/O, no clock of its own (callers pass
//! `now`), no Raft. [`HealthService`] (service.rs) runs it on the leader:
//! report streams feed it, and one task commits the verdict changes
//! through Raft. docs/HEALTH.md has the reasoning and the timing.

mod aggregator;
mod config;
mod probers;
mod service;
mod votes;

pub use aggregator::{
    BackendHealth, Evaluation, HealthAggregator, HealthStatus, ProberChange, ProberStatus,
    ProberView, VerdictChange, ZoneVotes, fail_open, zones_down,
};
pub use config::{HealthConfig, ZoneQuorum};
pub use probers::{ReportError, ReportOutcome};
pub use service::{HealthService, VERDICT_LABELS, export_committed, verdict_label, verdict_to_pb};
pub use votes::{View, ZoneTally};

#[cfg(test)]
mod tests;
