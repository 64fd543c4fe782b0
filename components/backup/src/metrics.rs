//! Prometheus metrics, all prefixed `bulwark_backup_`.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `bulwark_backup_last_success_timestamp_seconds` | gauge | when the last snapshot was committed |
//! | `bulwark_backup_last_duration_seconds` | gauge | how long it took |
//! | `bulwark_backup_last_raw_bytes` / `_last_stored_bytes` | gauge | its size from etcd / in the store |
//! | `bulwark_backup_snapshots_total` | counter | snapshots committed, by `trigger` |
//! | `bulwark_backup_failures_total` | counter | failed snapshots by `reason` (`etcd_unavailable`, `etcd_auth`, `etcd_hash_mismatch`, `store_unavailable`, `cancelled`, …) |
//! | `bulwark_backup_last_drill_success` | gauge | 1 if the last drill (or verification) passed, 0 if not |
//! | `bulwark_backup_last_drill_timestamp_seconds` | gauge | when it finished |
//! | `bulwark_backup_verify_mismatches_total` | counter | failed checks by `kind` (`stored_hash`, `decrypt`, …) |
//! | `bulwark_backup_leader` | gauge | 1 while this instance leads scheduled work |
//! | `bulwark_backup_retention_deleted_total` | counter | snapshots deleted by retention |
//! | `bulwark_backup_gc_collected_total` | counter | leftover uploads removed |

use crate::error::BackupError;
use crate::manifest::{Manifest, VerificationRecord};

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
        crate::manifest::Trigger::Scheduled => "scheduled",
        crate::manifest::Trigger::Manual => "manual",
        crate::manifest::Trigger::PreRestore => "pre_restore",
    };
    metrics::counter!("bulwark_backup_snapshots_total", "trigger" => trigger).increment(1);
}

/// Records a failed snapshot.
pub fn snapshot_failed(e: &BackupError) {
    metrics::counter!("bulwark_backup_failures_total", "reason" => e.reason()).increment(1);
}

/// Records a verification or drill outcome.
pub fn verified(r: &VerificationRecord) {
    metrics::gauge!("bulwark_backup_last_drill_success").set(if r.passed { 1.0 } else { 0.0 });
    metrics::gauge!("bulwark_backup_last_drill_timestamp_seconds")
        .set(r.verified_at.timestamp() as f64);
    for m in &r.mismatches {
        metrics::counter!("bulwark_backup_verify_mismatches_total", "kind" => m.kind.as_str())
            .increment(1);
    }
}

/// Records a retention run.
pub fn retention(deleted: usize, collected: usize) {
    metrics::counter!("bulwark_backup_retention_deleted_total").increment(deleted as u64);
    metrics::counter!("bulwark_backup_gc_collected_total").increment(collected as u64);
}
