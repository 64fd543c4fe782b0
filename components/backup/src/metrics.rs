//! Prometheus metrics, all prefixed `bulwark_backup_`.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `bulwark_backup_last_success_timestamp_seconds` | gauge | when the last snapshot was committed |
//! | `bulwark_backup_last_duration_seconds` | gauge | how long it took |
//! | `bulwark_backup_last_raw_bytes` / `_last_stored_bytes` | gauge | its size from etcd / in the store |
//! | `bulwark_backup_snapshots_total` | counter | snapshots committed, by `trigger` |
//! | `bulwark_backup_failures_total` | counter | failed snapshots by `reason` (`etcd_unavailable`, `etcd_auth`, `etcd_hash_mismatch`, `store_unavailable`, `cancelled`, …) |
//! | `bulwark_backup_last_drill_success` | gauge | 1 if the last drill passed, 0 if not |
//! | `bulwark_backup_last_drill_timestamp_seconds` | gauge | when it finished |
//! | `bulwark_backup_last_verify_success` | gauge | 1 if the last plain verification (no drill) passed, 0 if not |
//! | `bulwark_backup_last_verify_timestamp_seconds` | gauge | when it finished |
//! | `bulwark_backup_verify_mismatches_total` | counter | failed checks by `kind` (`stored_hash`, `decrypt`, …) |
//! | `bulwark_backup_leader` | gauge | 1 while this instance leads scheduled work |
//! | `bulwark_backup_retention_deleted_total` | counter | snapshots deleted by retention |
//! | `bulwark_backup_gc_collected_total` | counter | unreferenced objects removed by garbage collection, by `reason` (`upload_without_manifest`, `segment_without_record`, `restore_target`) |
//! | `bulwark_backup_gc_collected_bytes_total` | counter | their bytes |
//! | `bulwark_backup_delta_segments_total` | counter | delta segments committed |
//! | `bulwark_backup_delta_events_total` | counter | etcd events in them |
//! | `bulwark_backup_delta_gaps_total` | counter | gaps (compaction, missing revision) that forced a full snapshot |
//! | `bulwark_backup_delta_covered_revision` | gauge | newest etcd revision in a committed segment |
//! | `bulwark_backup_delta_rpo_lag_seconds` | gauge | age of the oldest event not yet committed (0: all committed) |
//! | `bulwark_backup_delta_running` | gauge | 1 while this instance records deltas |
//! | `bulwark_backup_restores_total` | counter | restores coordinated here, by `outcome` |
//! | `bulwark_backup_restore_phase_seconds` | gauge | how long each phase of the last restore coordinated here took, by `phase` |
//! | `bulwark_backup_restore_step_seconds` | gauge | how long each node's step of that restore took, by `node` and `step` |

use bulwark_common::telemetry::catalog::{self, MetricDef, MetricKind::*};

use crate::error::BackupError;
use crate::snapshot::manifest::{Manifest, VerificationRecord};

/// The catalogue: every metric above with its `# HELP` text.
///
/// The `last_*` gauges describe the last snapshot or drill *this process*
/// saw; they are absent until then rather than 0, because a 0 timestamp
/// would make "no backup for two intervals" fire on every restart (the
/// rules use `max` over instances and `absent` with a long `for`).
pub const DEFS: &[MetricDef] = &[
    MetricDef::dynamic(
        "bulwark_backup_last_success_timestamp_seconds",
        Gauge,
        "When the last snapshot this instance committed was finished, in seconds since the epoch.",
    ),
    MetricDef::dynamic(
        "bulwark_backup_last_duration_seconds",
        Gauge,
        "How long the last snapshot this instance committed took.",
    ),
    MetricDef::dynamic(
        "bulwark_backup_last_raw_bytes",
        Gauge,
        "Size of the last committed snapshot as etcd sent it.",
    ),
    MetricDef::dynamic(
        "bulwark_backup_last_stored_bytes",
        Gauge,
        "Size of the last committed snapshot in the store (compressed, encrypted).",
    ),
    MetricDef::per_label(
        "bulwark_backup_snapshots_total",
        Counter,
        "Snapshots committed by this instance, by trigger.",
        "trigger",
        &["scheduled", "manual", "pre_restore"],
    ),
    MetricDef::dynamic(
        "bulwark_backup_failures_total",
        Counter,
        "Failed snapshots, by reason.",
    ),
    MetricDef::dynamic(
        "bulwark_backup_last_drill_success",
        Gauge,
        "1 if the last drill this instance ran passed, 0 if not (absent until one ran).",
    ),
    MetricDef::dynamic(
        "bulwark_backup_last_drill_timestamp_seconds",
        Gauge,
        "When the last drill this instance ran finished.",
    ),
    MetricDef::dynamic(
        "bulwark_backup_last_verify_success",
        Gauge,
        "1 if the last plain verification (no drill) this instance ran passed, 0 if not (absent until one ran).",
    ),
    MetricDef::dynamic(
        "bulwark_backup_last_verify_timestamp_seconds",
        Gauge,
        "When the last plain verification (no drill) this instance ran finished.",
    ),
    MetricDef::dynamic(
        "bulwark_backup_verify_mismatches_total",
        Counter,
        "Failed verification checks, by kind.",
    ),
    MetricDef::single(
        "bulwark_backup_leader",
        Gauge,
        "1 while this instance leads scheduled work (summed over instances it should be 1).",
    ),
    MetricDef::single(
        "bulwark_backup_retention_deleted_total",
        Counter,
        "Snapshots deleted by retention.",
    ),
    MetricDef::per_label(
        "bulwark_backup_gc_collected_total",
        Counter,
        "Unreferenced objects removed by garbage collection, by reason.",
        "reason",
        &[
            "upload_without_manifest",
            "segment_without_record",
            "restore_target",
        ],
    ),
    MetricDef::single(
        "bulwark_backup_gc_collected_bytes_total",
        Counter,
        "Bytes of unreferenced objects removed by garbage collection.",
    ),
    MetricDef::single(
        "bulwark_backup_delta_segments_total",
        Counter,
        "Delta segments committed.",
    ),
    MetricDef::single(
        "bulwark_backup_delta_events_total",
        Counter,
        "etcd events in committed delta segments.",
    ),
    MetricDef::single(
        "bulwark_backup_delta_gaps_total",
        Counter,
        "Gaps in the delta stream (compaction, missing revision) that forced a full snapshot.",
    ),
    MetricDef::single(
        "bulwark_backup_delta_covered_revision",
        Gauge,
        "Newest etcd revision in a committed delta segment (0: none on this instance).",
    ),
    MetricDef::single(
        "bulwark_backup_delta_rpo_lag_seconds",
        Gauge,
        "Age of the oldest etcd event not yet in a committed segment (0: all committed).",
    ),
    MetricDef::single(
        "bulwark_backup_delta_running",
        Gauge,
        "1 while this instance records deltas.",
    ),
    MetricDef::per_label(
        "bulwark_backup_restores_total",
        Counter,
        "Restores coordinated by this instance, by outcome.",
        "outcome",
        &["done", "dry_run", "failed"],
    ),
    MetricDef::dynamic(
        "bulwark_backup_restore_phase_seconds",
        Gauge,
        "How long each phase of the last restore this instance coordinated took, by phase.",
    ),
    MetricDef::dynamic(
        "bulwark_backup_restore_step_seconds",
        Gauge,
        "How long each node's step of the last restore this instance coordinated took, by node and step.",
    ),
];

/// Declares the catalogue, the build info and the certificate expiry of
/// the gRPC (and restore client) identities. Call once at start.
pub fn register(certificates: &[bulwark_common::tls::CertFiles]) {
    catalog::register(DEFS);
    catalog::register_build_info("backup", env!("CARGO_PKG_VERSION"));
    catalog::register_certificates("backup", certificates);
}

/// Gauge: 1 while this instance leads.
pub const LEADER: &str = "bulwark_backup_leader";

/// Records a committed snapshot.
pub fn snapshot_committed(m: &Manifest) {
    let took = (m.finished_at - m.started_at).num_milliseconds() as f64 / 1000.0;
    metrics::gauge!("bulwark_backup_last_success_timestamp_seconds")
        .set(m.finished_at.timestamp() as f64);
    metrics::gauge!("bulwark_backup_last_duration_seconds").set(took);
    metrics::gauge!("bulwark_backup_last_raw_bytes").set(m.raw_size_bytes as f64);
    metrics::gauge!("bulwark_backup_last_stored_bytes").set(m.stored_size_bytes as f64);
    let trigger = match m.trigger {
        crate::snapshot::manifest::Trigger::Scheduled => "scheduled",
        crate::snapshot::manifest::Trigger::Manual => "manual",
        crate::snapshot::manifest::Trigger::PreRestore => "pre_restore",
    };
    metrics::counter!("bulwark_backup_snapshots_total", "trigger" => trigger).increment(1);
}

/// Records a failed snapshot.
pub fn snapshot_failed(e: &BackupError) {
    metrics::counter!("bulwark_backup_failures_total", "reason" => e.reason()).increment(1);
}

/// Records a verification or drill outcome, each in its own gauges: a
/// plain verification of an old snapshot must neither fail nor refresh
/// the drill that the alerts watch.
pub fn verified(r: &VerificationRecord) {
    let passed = if r.passed { 1.0 } else { 0.0 };
    let at = r.verified_at.timestamp() as f64;
    if r.drill {
        metrics::gauge!("bulwark_backup_last_drill_success").set(passed);
        metrics::gauge!("bulwark_backup_last_drill_timestamp_seconds").set(at);
    } else {
        metrics::gauge!("bulwark_backup_last_verify_success").set(passed);
        metrics::gauge!("bulwark_backup_last_verify_timestamp_seconds").set(at);
    }
    for m in &r.mismatches {
        metrics::counter!("bulwark_backup_verify_mismatches_total", "kind" => m.kind.as_str())
            .increment(1);
    }
}

/// Records a retention run.
pub fn retention(deleted: usize) {
    metrics::counter!("bulwark_backup_retention_deleted_total").increment(deleted as u64);
}

/// Records what a garbage collection deleted.
pub fn garbage_collected(c: &crate::snapshot::gc::Collection) {
    for g in &c.collected {
        metrics::counter!("bulwark_backup_gc_collected_total", "reason" => g.reason.as_str())
            .increment(1);
    }
    metrics::counter!("bulwark_backup_gc_collected_bytes_total").increment(c.collected_bytes());
}

/// Records a committed delta segment of `event_count` events.
pub fn delta_committed(event_count: u64) {
    metrics::counter!("bulwark_backup_delta_segments_total").increment(1);
    metrics::counter!("bulwark_backup_delta_events_total").increment(event_count);
}

/// Records a delta gap.
pub fn delta_gap() {
    metrics::counter!("bulwark_backup_delta_gaps_total").increment(1);
}

/// Publishes the delta recorder's status: the newest covered revision,
/// the RPO lag and whether it runs. (Plain values, so this module does not
/// depend on the recorder's types.)
pub fn delta_status(newest_revision: i64, lag: std::time::Duration, running: bool) {
    metrics::gauge!("bulwark_backup_delta_covered_revision").set(newest_revision as f64);
    metrics::gauge!("bulwark_backup_delta_rpo_lag_seconds").set(lag.as_secs_f64());
    metrics::gauge!("bulwark_backup_delta_running").set(if running { 1.0 } else { 0.0 });
}

/// Records the end of a restore.
pub fn restore_finished(outcome: &'static str) {
    metrics::counter!("bulwark_backup_restores_total", "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the code records is in the catalogue, and nothing
    /// else is: the names come from the source files themselves.
    #[test]
    fn the_catalogue_lists_exactly_the_recorded_metrics() {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        catalog::check_against_sources(DEFS, src.as_ref(), "bulwark_backup_").unwrap();
    }
}
