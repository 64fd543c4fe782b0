//! Verifying a stored snapshot (`Engine::verify_snapshot`): the stream
//! check, then a drill when asked; the record stored and returned.

use std::time::Instant;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::error::Result;
use crate::snapshot::manifest::{FORMAT_VERSION, VerificationRecord};
use crate::verify::drill::run_drill;
use crate::verify::workdir::WorkDir;
use crate::verify::{Stage, VerifyEvent, VerifyProgress};

impl Engine {
    /// Verifies snapshot `id` (with a drill when asked), stores the record
    /// and returns it. A failed check is a record with `passed = false`;
    /// `Err` means the check could not run (no such snapshot, store down).
    pub async fn verify_snapshot(
        &self,
        id: &str,
        drill: bool,
        progress: &dyn VerifyProgress,
        cancel: &CancellationToken,
    ) -> Result<VerificationRecord> {
        let entry = self.get_snapshot(id).await?;
        let started = Instant::now();
        let workdir = if drill {
            Some(WorkDir::new(&self.drill, "bulwark-drill-")?)
        } else {
            None
        };
        let decoded_path = workdir.as_ref().map(|d| d.path().join("snapshot.db"));
        let mut mismatches = self
            .stream_check(
                &entry,
                decoded_path.clone(),
                &|bytes_done, bytes_total, elapsed| {
                    progress.event(VerifyEvent {
                        stage: Stage::StreamCheck,
                        bytes_done,
                        bytes_total,
                        elapsed,
                        detail: String::new(),
                    })
                },
                cancel,
            )
            .await?;
        let mut restored_revision = None;
        let mut restored_key_count = None;
        if let (Some(dir), Some(db), true) = (&workdir, &decoded_path, mismatches.is_empty()) {
            match run_drill(
                &self.drill,
                dir.path(),
                db,
                &entry.manifest,
                progress,
                cancel,
            )
            .await
            {
                Ok(found) => {
                    restored_revision = Some(found.revision);
                    restored_key_count = Some(found.key_count);
                    mismatches.extend(found.mismatches);
                }
                Err(m) => mismatches.push(m),
            }
        }
        drop(workdir);
        let record = VerificationRecord {
            format_version: FORMAT_VERSION,
            snapshot_id: id.to_owned(),
            verified_at: Utc::now(),
            passed: mismatches.is_empty(),
            drill,
            mismatches,
            restored_revision,
            restored_key_count,
            took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            verified_by: self.node_name.clone(),
        };
        if record.passed {
            tracing::info!(snapshot_id = %id, drill, "verification passed");
        } else {
            tracing::warn!(
                snapshot_id = %id,
                drill,
                mismatches = ?record.mismatches.iter().map(|m| m.kind.as_str()).collect::<Vec<_>>(),
                "verification failed"
            );
        }
        if let Err(e) = self.record_verification(&record).await {
            tracing::warn!(error = %e, "storing the verification record failed");
        }
        Ok(record)
    }
}
