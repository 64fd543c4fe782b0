//! Garbage collection: stored objects that no committed record names.
//!
//! Three kinds are left behind by crashes and failures, and nothing else
//! ever reads them:
//!
//! | kind | left by | found as |
//! |---|---|---|
//! | upload without a manifest | a snapshot that failed or was interrupted before its commit point, a half-finished delete | `full/<id>/…` with no `manifest.json` |
//! | segment without a record | a recorder that died between a segment's data object and its `.json` record | `delta/<base>/<name>.seg…` with no `<name>.json` |
//! | restore target | a coordinator that died before it deleted the point-in-time target it built (a snapshot-only restore writes none) | anything under `restore/<restore id>/` |
//!
//! An object is collected only once it is older than `gcGracePeriod` (by
//! its newest sibling for an upload, and by the id's time too): an upload,
//! a segment or a restore still running keeps writing, and another instance
//! may be the one writing. [`Engine::collect_garbage`] with `dry_run` lists
//! what would go without deleting anything; retention runs it for real
//! after every scheduled snapshot.

use std::collections::BTreeSet;

use chrono::{DateTime, TimeDelta, Utc};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt as _};

use crate::engine::Engine;
use crate::error::Result;
use crate::store::layout::{DELTA_DIR, RESTORE_DIR, id_time};

/// Why an object is garbage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Under `full/<id>/` with no manifest.
    UploadWithoutManifest,
    /// A delta data object with no segment record.
    SegmentWithoutRecord,
    /// A restore's target snapshot left in the store.
    RestoreTarget,
}

impl Reason {
    /// The label used in metrics, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UploadWithoutManifest => "upload_without_manifest",
            Reason::SegmentWithoutRecord => "segment_without_record",
            Reason::RestoreTarget => "restore_target",
        }
    }
}

/// One unreferenced object.
#[derive(Clone, Debug)]
pub struct Garbage {
    /// Its path relative to the store's location.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// When it was last written.
    pub last_modified: DateTime<Utc>,
    /// Why nothing needs it.
    pub reason: Reason,
    /// The snapshot directory it is in, for an upload without a manifest.
    pub snapshot_id: Option<String>,
    location: Path,
}

/// What one collection found and did.
#[derive(Clone, Debug, Default)]
pub struct Collection {
    /// Unreferenced objects past the grace period: deleted, or (dry run)
    /// those that would be.
    pub collected: Vec<Garbage>,
    /// Unreferenced objects still within the grace period (kept).
    pub young: Vec<Garbage>,
    /// Objects past the grace period that could not be deleted (each
    /// logged).
    pub failed: Vec<Garbage>,
    /// Whether nothing was deleted.
    pub dry_run: bool,
}

impl Collection {
    /// Bytes of the collected objects.
    pub fn collected_bytes(&self) -> u64 {
        self.collected.iter().map(|g| g.size).sum()
    }

    /// Snapshot directories without a manifest whose every object was
    /// collected.
    pub fn collected_uploads(&self) -> Vec<String> {
        let failed: BTreeSet<&str> = self
            .failed
            .iter()
            .filter_map(|g| g.snapshot_id.as_deref())
            .collect();
        let ids: BTreeSet<&str> = self
            .collected
            .iter()
            .filter_map(|g| g.snapshot_id.as_deref())
            .filter(|id| !failed.contains(id))
            .collect();
        ids.into_iter().map(str::to_owned).collect()
    }
}

/// An object found, with whether it is past the grace period.
type Found = (Garbage, bool);

/// The grace period as of one instant.
#[derive(Clone, Copy)]
struct Cutoff {
    now: DateTime<Utc>,
    grace: TimeDelta,
}

impl Cutoff {
    /// Whether something last written at `t` is past the grace period.
    fn passed(self, t: DateTime<Utc>) -> bool {
        self.now.signed_duration_since(t) > self.grace
    }
}

impl Engine {
    /// Finds every unreferenced object and, unless `dry_run`, deletes those
    /// older than the grace period at `now`.
    pub async fn collect_garbage(&self, now: DateTime<Utc>, dry_run: bool) -> Result<Collection> {
        let old = Cutoff {
            now,
            grace: TimeDelta::from_std(self.gc_grace_period).unwrap_or(TimeDelta::MAX),
        };
        let mut found = self.unmanifested_uploads(old).await?;
        found.extend(self.unrecorded_segments(old).await?);
        found.extend(self.restore_targets(old).await?);
        let mut collection = Collection {
            dry_run,
            ..Default::default()
        };
        for (garbage, expired) in found {
            if !expired {
                collection.young.push(garbage);
            } else if dry_run || self.delete_garbage(&garbage).await {
                collection.collected.push(garbage);
            } else {
                collection.failed.push(garbage);
            }
        }
        Ok(collection)
    }

    /// `full/<id>/` directories without a manifest. A directory is past
    /// the grace period by its newest object, and by the id's time when it
    /// has one: an upload still running keeps writing new parts.
    async fn unmanifested_uploads(&self, old: Cutoff) -> Result<Vec<Found>> {
        let scan = self.scan().await?;
        let mut out = Vec::new();
        for left in &scan.leftovers {
            let expired = left.last_modified().is_some_and(|t| old.passed(t))
                && id_time(&left.id).is_none_or(|t| old.passed(t));
            out.extend(left.objects.iter().map(|m| {
                let mut g = self.garbage(m, Reason::UploadWithoutManifest);
                g.snapshot_id = Some(left.id.clone());
                (g, expired)
            }));
        }
        Ok(out)
    }

    /// Delta data objects whose `<name>.json` record is missing.
    async fn unrecorded_segments(&self, old: Cutoff) -> Result<Vec<Found>> {
        let metas = self
            .store
            .list_all(&self.layout.root().clone().join(DELTA_DIR))
            .await?;
        let records: BTreeSet<&str> = metas
            .iter()
            .filter_map(|m| m.location.as_ref().strip_suffix(".json"))
            .collect();
        Ok(metas
            .iter()
            .filter(|m| {
                let name = m.location.as_ref();
                !name.ends_with(".json")
                    && !records.contains(name.split_once(".seg").map_or(name, |(stem, _)| stem))
            })
            .map(|m| {
                (
                    self.garbage(m, Reason::SegmentWithoutRecord),
                    old.passed(m.last_modified),
                )
            })
            .collect())
    }

    /// Everything under `restore/`: targets the coordinator deletes once
    /// the members are done with them.
    async fn restore_targets(&self, old: Cutoff) -> Result<Vec<Found>> {
        let metas = self
            .store
            .list_all(&self.layout.root().clone().join(RESTORE_DIR))
            .await?;
        Ok(metas
            .iter()
            .map(|m| {
                (
                    self.garbage(m, Reason::RestoreTarget),
                    old.passed(m.last_modified),
                )
            })
            .collect())
    }

    fn garbage(&self, meta: &ObjectMeta, reason: Reason) -> Garbage {
        Garbage {
            path: self.layout.relative(self.store.prefix(), &meta.location),
            size: meta.size,
            last_modified: meta.last_modified,
            reason,
            snapshot_id: None,
            location: meta.location.clone(),
        }
    }

    /// Deletes one object (already gone counts as deleted); false, logged,
    /// when the store refused.
    async fn delete_garbage(&self, garbage: &Garbage) -> bool {
        match self.store.inner().delete(&garbage.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                tracing::info!(
                    object = %garbage.path,
                    bytes = garbage.size,
                    reason = garbage.reason.as_str(),
                    "garbage collected"
                );
                true
            }
            Err(e) => {
                tracing::warn!(object = %garbage.path, error = %e, "garbage collection could not delete");
                false
            }
        }
    }
}
