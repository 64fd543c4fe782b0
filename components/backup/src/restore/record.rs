//! `<cluster>/restores/<restore id>.json`: what a finished restore leaves
//! in the store, so every instance (and a restarted one) knows the live
//! cluster's history starts at the restore point: snapshots and deltas
//! taken before it describe the abandoned timeline, and coverage shown in
//! status starts again from the restored revision.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::delta::SegmentMeta;
use crate::engine::Engine;
use crate::error::{BackupError, Corruption, Result};
use crate::snapshot::manifest::Manifest;

/// Directory of the records, under the cluster's root.
const RESTORES_DIR: &str = "restores";

/// One finished restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRecord {
    /// Restore id.
    pub restore_id: String,
    /// When the restored cluster answered at the target.
    pub finished_at: DateTime<Utc>,
    /// The snapshot restored from.
    pub snapshot_id: String,
    /// The revision restored to (before any bump).
    pub revision: i64,
    /// The restored cluster's etcd id.
    pub cluster_id: u64,
    /// Node name of the coordinating instance.
    pub coordinated_by: String,
}

impl Engine {
    /// Stores `record` (after a restore that was not a dry run).
    pub async fn record_restore(&self, record: &RestoreRecord) -> Result<()> {
        let path = self
            .layout
            .root()
            .clone()
            .join(RESTORES_DIR)
            .join(format!("{}.json", record.restore_id));
        let body = serde_json::to_vec_pretty(record).unwrap_or_default();
        self.store
            .inner()
            .put(&path, PutPayload::from(body))
            .await
            .map(drop)
            .map_err(|e| BackupError::store(self.store.describe(&path), e))
    }

    /// The newest finished restore, if any.
    pub async fn last_restore(&self) -> Result<Option<RestoreRecord>> {
        let dir = self.layout.root().clone().join(RESTORES_DIR);
        let objects: Vec<_> = self
            .store
            .inner()
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| BackupError::store(self.store.describe(&dir), e))?;
        // Restore ids start with their UTC time: the greatest is the newest.
        let Some(newest) = objects
            .iter()
            .filter(|o| o.location.as_ref().ends_with(".json"))
            .max_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()))
        else {
            return Ok(None);
        };
        let bytes = self
            .store
            .inner()
            .get(&newest.location)
            .await
            .map_err(|e| BackupError::store(self.store.describe(&newest.location), e))?
            .bytes()
            .await
            .map_err(|e| BackupError::store(self.store.describe(&newest.location), e))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| BackupError::Corrupt {
                kind: Corruption::Manifest,
                what: newest.location.to_string(),
                detail: e.to_string(),
            })
    }
}

/// The newest revision that can be restored of the live cluster's
/// history: the newest snapshot plus its unbroken deltas, or, when a
/// restore finished after that snapshot was taken, the restore point
/// itself (that snapshot and its deltas are the abandoned timeline).
pub fn covered_revision(
    latest: Option<&Manifest>,
    segments: &[SegmentMeta],
    last_restore: Option<&RestoreRecord>,
) -> Option<i64> {
    if let Some(r) = last_restore
        && latest.is_none_or(|m| m.started_at < r.finished_at)
    {
        return Some(r.revision);
    }
    latest.map(|m| {
        crate::delta::check_continuity(m.revision, segments)
            .unwrap_or(m.revision)
            .max(m.revision_max)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::segments::tests::seg as segment;
    use crate::snapshot::manifest::tests::sample;

    #[test]
    fn coverage_after_a_restore_starts_from_the_restore_point() {
        let mut snap = sample();
        snap.revision = 150;
        snap.revision_max = 150;
        let deltas = [segment(151, 180), segment(181, 205)];
        assert_eq!(covered_revision(Some(&snap), &deltas, None), Some(205));

        // Restored to 104 after that snapshot: 205 is the old timeline.
        let restore = RestoreRecord {
            restore_id: "r".into(),
            finished_at: snap.started_at + chrono::Duration::minutes(5),
            snapshot_id: "s".into(),
            revision: 104,
            cluster_id: 7,
            coordinated_by: "cp-1".into(),
        };
        assert_eq!(
            covered_revision(Some(&snap), &deltas, Some(&restore)),
            Some(104)
        );
        assert_eq!(covered_revision(None, &[], Some(&restore)), Some(104));

        // A snapshot of the restored cluster: coverage grows from it.
        let mut after = sample();
        after.started_at = restore.finished_at + chrono::Duration::minutes(1);
        after.revision = 1_000_120;
        after.revision_max = 1_000_120;
        let deltas = [segment(1_000_121, 1_000_130)];
        assert_eq!(
            covered_revision(Some(&after), &deltas, Some(&restore)),
            Some(1_000_130)
        );
        assert_eq!(covered_revision(None, &[], None), None);
    }
}
