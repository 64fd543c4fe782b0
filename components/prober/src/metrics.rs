//! The prober's Prometheus metrics, all prefixed `bulwark_prober_`.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `probe_duration_seconds` | target, kind | latency of every probe, pass or fail |
//! | `probes_total` | target, kind, reason | every probe by result class |
//! | `check_up` | target, kind | settled state: 1 up, 0 down (absent until settled) |
//! | `check_transitions_total` | target, kind, to | settled state changes |
//! | `report_connected` | | 1 while a stream to the LB leader is acknowledged |
//! | `reports_sent_total` | kind | reports handed to the stream (full, changes, heartbeat) |
//! | `report_reconnects_total` | cause | streams ended: redirect, error, closed, ack_timeout |
//! | `resyncs_total` | | FULL reports the LB asked for |

use bulwark_api::lb::v1::{ProbeReason, ReportKind};
use bulwark_common::telemetry::catalog::{self, MetricDef, MetricKind::*};

use crate::config::ProberConfig;
use crate::probe::Outcome;

/// The catalogue: every metric above with its `# HELP` text. Per-check
/// series (`target`, `kind`) appear when the check first probes or
/// settles: `check_up` is absent rather than 0 until a check has settled,
/// because 0 would claim the target is down.
pub const DEFS: &[MetricDef] = &[
    MetricDef::dynamic(
        "bulwark_prober_probe_duration_seconds",
        Histogram,
        "Latency of every probe, pass or fail, by target and kind.",
    ),
    MetricDef::dynamic(
        "bulwark_prober_probes_total",
        Counter,
        "Probes by target, kind and result reason.",
    ),
    MetricDef::dynamic(
        "bulwark_prober_check_up",
        Gauge,
        "Settled state of a check after fall/rise debouncing: 1 up, 0 down (absent until settled).",
    ),
    MetricDef::dynamic(
        "bulwark_prober_check_transitions_total",
        Counter,
        "Settled state changes of a check, by target, kind and new state.",
    ),
    MetricDef::single(
        "bulwark_prober_report_connected",
        Gauge,
        "1 while a report stream to the LB leader is acknowledged.",
    ),
    MetricDef::per_label(
        "bulwark_prober_reports_sent_total",
        Counter,
        "Reports handed to the stream, by kind.",
        "kind",
        &["full", "changes", "heartbeat"],
    ),
    MetricDef::per_label(
        "bulwark_prober_report_reconnects_total",
        Counter,
        "Report streams that ended, by cause.",
        "cause",
        &["redirect", "error", "closed", "ack_timeout"],
    ),
    MetricDef::single(
        "bulwark_prober_resyncs_total",
        Counter,
        "FULL reports the LB leader asked for.",
    ),
];

/// Declares the catalogue, the build info and the expiry of every
/// certificate the config uses. Call once at start.
pub fn register(config: &ProberConfig) {
    catalog::register(DEFS);
    catalog::register_build_info("prober", env!("CARGO_PKG_VERSION"));
    let files: Vec<_> = config.certificates().into_iter().map(|(_, f)| f).collect();
    catalog::register_certificates("prober", &files);
}

/// The label of a probe reason.
pub(crate) fn reason_label(reason: ProbeReason) -> &'static str {
    match reason {
        ProbeReason::Ok => "ok",
        ProbeReason::HttpStatus => "http_status",
        ProbeReason::Timeout => "timeout",
        ProbeReason::TlsError => "tls_error",
        ProbeReason::ConnectionRefused => "connection_refused",
        ProbeReason::ConnectionReset => "connection_reset",
        ProbeReason::Dns => "dns",
        ProbeReason::Other | ProbeReason::Unspecified => "other",
    }
}

pub(crate) fn probe_finished(target: &str, kind: &'static str, outcome: &Outcome) {
    metrics::histogram!(
        "bulwark_prober_probe_duration_seconds",
        "target" => target.to_owned(),
        "kind" => kind,
    )
    .record(outcome.latency.as_secs_f64());
    metrics::counter!(
        "bulwark_prober_probes_total",
        "target" => target.to_owned(),
        "kind" => kind,
        "reason" => reason_label(outcome.reason),
    )
    .increment(1);
}

pub(crate) fn check_settled(target: &str, kind: &'static str, up: bool) {
    metrics::gauge!(
        "bulwark_prober_check_up",
        "target" => target.to_owned(),
        "kind" => kind,
    )
    .set(if up { 1.0 } else { 0.0 });
    metrics::counter!(
        "bulwark_prober_check_transitions_total",
        "target" => target.to_owned(),
        "kind" => kind,
        "to" => if up { "up" } else { "down" },
    )
    .increment(1);
}

pub(crate) fn report_sent(kind: ReportKind) {
    let kind = match kind {
        ReportKind::Full => "full",
        ReportKind::Changes => "changes",
        ReportKind::Heartbeat => "heartbeat",
        ReportKind::Unspecified => "unspecified",
    };
    metrics::counter!("bulwark_prober_reports_sent_total", "kind" => kind).increment(1);
}

pub(crate) fn connected(yes: bool) {
    metrics::gauge!("bulwark_prober_report_connected").set(if yes { 1.0 } else { 0.0 });
}

pub(crate) fn reconnect(cause: &'static str) {
    metrics::counter!("bulwark_prober_report_reconnects_total", "cause" => cause).increment(1);
}

pub(crate) fn resync() {
    metrics::counter!("bulwark_prober_resyncs_total").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the code records is in the catalogue, and nothing
    /// else is: the names come from the source files themselves.
    #[test]
    fn the_catalogue_lists_exactly_the_recorded_metrics() {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        catalog::check_against_sources(DEFS, src.as_ref(), "bulwark_prober_").unwrap();
    }
}
