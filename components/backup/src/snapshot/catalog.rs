//! What is in the store: committed snapshots (those with a manifest), their
//! verification records, and leftovers of failed uploads; deleting,
//! retention and garbage collection.
//!
//! Deleting removes the manifest first, so a snapshot stops existing in one
//! step, then its other objects; if that second step fails half-way, what
//! remains is a leftover (no manifest), which garbage collection removes
//! after the grace period. Nothing is ever half a snapshot.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};

use crate::engine::Engine;
use crate::error::{BackupError, Result};
use crate::snapshot::manifest::{Manifest, VerificationRecord};
use crate::snapshot::retention::{Candidate, RetentionPolicy};
use crate::store::layout::{Entry, is_valid_id};

/// A committed snapshot and its newest verification.
#[derive(Clone, Debug)]
pub struct SnapshotEntry {
    /// The manifest.
    pub manifest: Manifest,
    /// The newest verification record, if any.
    pub last_verification: Option<VerificationRecord>,
}

impl SnapshotEntry {
    /// Whether it may serve as "the newest valid snapshot": committed and
    /// not failed by its last verification.
    pub fn is_valid(&self) -> bool {
        self.last_verification.as_ref().is_none_or(|v| v.passed)
    }
}

/// Objects of one snapshot directory without a manifest.
#[derive(Clone, Debug)]
pub struct Leftover {
    /// The directory's id.
    pub id: String,
    /// Its objects.
    pub objects: Vec<ObjectMeta>,
}

impl Leftover {
    /// The newest modification among its objects.
    pub fn last_modified(&self) -> Option<DateTime<Utc>> {
        self.objects.iter().map(|o| o.last_modified).max()
    }
}

/// One listing of the cluster's `full/` directory.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Committed snapshots, newest first.
    pub snapshots: Vec<SnapshotEntry>,
    /// Directories without a manifest.
    pub leftovers: Vec<Leftover>,
    /// Every object, by snapshot id (to delete them and count sizes).
    pub objects: BTreeMap<String, Vec<ObjectMeta>>,
}

/// What [`Engine::delete_snapshot`] removed.
#[derive(Clone, Debug)]
pub struct Deleted {
    /// The snapshot.
    pub id: String,
    /// Bytes freed (snapshot and delta segments).
    pub freed_bytes: u64,
    /// Delta segments deleted with it.
    pub deleted_segments: u32,
}

/// What one retention run did.
#[derive(Clone, Debug, Default)]
pub struct RetentionOutcome {
    /// Snapshots deleted by the policy.
    pub deleted: Vec<String>,
    /// Snapshot directories without a manifest removed (every object of
    /// theirs collected).
    pub collected: Vec<String>,
    /// Snapshots kept.
    pub kept: usize,
    /// The garbage collection that followed.
    pub garbage: crate::snapshot::gc::Collection,
}

impl Engine {
    /// Lists `full/` and reads every manifest and newest verification record.
    pub async fn scan(&self) -> Result<Scan> {
        let full = self.layout.full_dir();
        let metas = self.store.list_all(&full).await?;
        let mut objects: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
        let mut has_manifest = BTreeMap::new();
        let mut newest_record: BTreeMap<String, String> = BTreeMap::new();
        for meta in metas {
            let Some(entry) = self.layout.classify(&meta.location) else {
                continue;
            };
            let id = entry.id().to_owned();
            match &entry {
                Entry::Manifest { .. } => {
                    has_manifest.insert(id.clone(), ());
                }
                Entry::Verification { name, .. } => {
                    let newest = newest_record.entry(id.clone()).or_default();
                    if *name > *newest {
                        *newest = name.clone();
                    }
                }
                Entry::Data { .. } | Entry::Other { .. } => {}
            }
            objects.entry(id).or_default().push(meta);
        }
        let ids: Vec<String> = has_manifest.keys().cloned().collect();
        let mut snapshots: Vec<SnapshotEntry> = futures::stream::iter(ids)
            .map(|id| {
                let record = newest_record.get(&id).cloned();
                async move { self.read_entry(&id, record.as_deref()).await }
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        snapshots.sort_by(|a, b| {
            b.manifest
                .started_at
                .cmp(&a.manifest.started_at)
                .then_with(|| b.manifest.id.cmp(&a.manifest.id))
        });
        let leftovers = objects
            .iter()
            .filter(|(id, _)| !has_manifest.contains_key(*id))
            .map(|(id, objs)| Leftover {
                id: id.clone(),
                objects: objs.clone(),
            })
            .collect();
        Ok(Scan {
            snapshots,
            leftovers,
            objects,
        })
    }

    async fn read_entry(&self, id: &str, record: Option<&str>) -> Result<SnapshotEntry> {
        let path = self.layout.manifest(id);
        let bytes = self.get_bytes(&path).await?;
        let manifest = Manifest::from_json(&self.store.describe(&path), &bytes)?;
        let last_verification = match record {
            None => None,
            Some(name) => {
                let p = self
                    .layout
                    .snapshot_dir(id)
                    .join(crate::store::layout::VERIFY_DIR)
                    .join(format!("{name}.json"));
                match self.get_bytes(&p).await {
                    Ok(b) => VerificationRecord::from_json(&self.store.describe(&p), &b).ok(),
                    Err(_) => None,
                }
            }
        };
        Ok(SnapshotEntry {
            manifest,
            last_verification,
        })
    }

    /// A whole (small) object: a manifest, a verification or cluster
    /// record.
    pub(crate) async fn get_bytes(&self, path: &Path) -> Result<bytes::Bytes> {
        let described = self.store.describe(path);
        self.store
            .inner()
            .get(path)
            .await
            .map_err(|e| BackupError::store(described.clone(), e))?
            .bytes()
            .await
            .map_err(|e| BackupError::store(described, e))
    }

    /// Committed snapshots, newest first.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        Ok(self.scan().await?.snapshots)
    }

    /// One committed snapshot by id.
    pub async fn get_snapshot(&self, id: &str) -> Result<SnapshotEntry> {
        if !is_valid_id(id) {
            return Err(BackupError::InvalidArgument(format!(
                "{id:?} is not a snapshot id (expected e.g. 20250102T030405Z-r42-3f2a)"
            )));
        }
        let verify_dir = self
            .layout
            .snapshot_dir(id)
            .join(crate::store::layout::VERIFY_DIR);
        let records = self.store.list_all(&verify_dir).await?;
        let newest = records
            .iter()
            .filter_map(|m| match self.layout.classify(&m.location) {
                Some(Entry::Verification { name, .. }) => Some(name),
                _ => None,
            })
            .max();
        self.read_entry(id, newest.as_deref())
            .await
            .map_err(|e| match e {
                BackupError::NotFound { .. } => BackupError::NotFound {
                    what: format!("snapshot {id}"),
                },
                other => other,
            })
    }

    /// The newest committed snapshot.
    pub async fn latest_snapshot(&self) -> Result<SnapshotEntry> {
        match self.list_snapshots().await?.into_iter().next() {
            Some(s) => Ok(s),
            None => Err(self.no_snapshot("any snapshot").await),
        }
    }

    /// "`what` not found", naming where this instance looked and, when
    /// the store holds other `clusterName`s' directories, those: what a
    /// fresh config on a new host with another `clusterName` than the
    /// old hosts' meets, instead of an empty catalog that looks like lost
    /// backups.
    pub async fn no_snapshot(&self, what: &str) -> BackupError {
        let looked = self.store.describe(&self.layout.full_dir());
        let others: Vec<String> = match self
            .store
            .inner()
            .list_with_delimiter(Some(self.store.prefix()))
            .await
        {
            Ok(listing) => listing
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_owned))
                .filter(|n| *n != self.cluster_name)
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "listing the store's cluster directories");
                Vec::new()
            }
        };
        let hint = match others.is_empty() {
            true => String::new(),
            false => format!(
                " (this store holds backups under clusterName {}; this instance's clusterName is {:?})",
                others.join(", "),
                self.cluster_name
            ),
        };
        BackupError::NotFound {
            what: format!("{what} in {looked}{hint}"),
        }
    }

    /// Whether etcd cluster `live` (its id) continues this store's
    /// history: `Ok(())` when the store holds no snapshot yet, a snapshot
    /// of that cluster, or a finished restore that made it; otherwise the
    /// refusal scheduled snapshots get. A cluster rebuilt empty on new
    /// hosts is not backed up over the history it is about to be restored
    /// from (its snapshot would become the newest, the one
    /// `bulwarkctl restore --snapshot latest` picks); an operator's
    /// `bulwarkctl backup create` starts a new history on purpose.
    pub async fn check_history(&self, live: u64) -> Result<()> {
        let snapshots = self.list_snapshots().await?;
        let clusters: Vec<u64> = snapshots.iter().map(|s| s.manifest.cluster_id()).collect();
        if snapshots.is_empty() || clusters.contains(&live) {
            return Ok(());
        }
        // Clusters a restore made, and every one backups saw before.
        let restored: Vec<u64> = self
            .timelines_for(snapshots.iter().map(|s| &s.manifest))
            .await?
            .all()
            .iter()
            .filter_map(|t| t.cluster_id)
            .collect();
        match foreign_cluster(live, &clusters, &restored) {
            None => Ok(()),
            Some(why) => Err(BackupError::Refused(format!(
                "{why}; the newest snapshot in {} is {} (revision {}): restore it \
                 (`bulwarkctl restore --snapshot latest --yes`), or take a snapshot by hand \
                 (`bulwarkctl backup create`) to start backing up this cluster here",
                self.store.describe(&self.layout.full_dir()),
                snapshots[0].manifest.id,
                snapshots[0].manifest.revision
            ))),
        }
    }

    /// Stores a verification record next to the snapshot's manifest.
    pub async fn record_verification(&self, record: &VerificationRecord) -> Result<()> {
        let path = self
            .layout
            .verification(&record.snapshot_id, record.verified_at);
        self.store
            .inner()
            .put(&path, PutPayload::from(record.to_json()))
            .await
            .map(drop)
            .map_err(|e| BackupError::store(self.store.describe(&path), e))
    }

    /// Deletes snapshot `id`: its manifest first, then its other objects.
    /// The newest snapshot and the newest one whose last verification
    /// passed need `force`.
    pub async fn delete_snapshot(&self, id: &str, force: bool) -> Result<Deleted> {
        if !is_valid_id(id) {
            return Err(BackupError::InvalidArgument(format!(
                "{id:?} is not a snapshot id"
            )));
        }
        let scan = self.scan().await?;
        if !scan.snapshots.iter().any(|s| s.manifest.id == id) {
            return Err(BackupError::NotFound {
                what: format!("snapshot {id}"),
            });
        }
        if !force {
            let newest = scan.snapshots.first().map(|s| s.manifest.id.as_str());
            let newest_verified = scan
                .snapshots
                .iter()
                .find(|s| s.last_verification.as_ref().is_some_and(|v| v.passed))
                .map(|s| s.manifest.id.as_str());
            if newest == Some(id) || newest_verified == Some(id) {
                return Err(BackupError::Refused(format!(
                    "snapshot {id} is the newest{} snapshot; deleting it shortens what can be \
                     restored: pass force to delete it anyway",
                    if newest == Some(id) { "" } else { " verified" }
                )));
            }
        }
        let objects = scan.objects.get(id).cloned().unwrap_or_default();
        self.remove_snapshot(id, &objects).await
    }

    async fn remove_snapshot(&self, id: &str, objects: &[ObjectMeta]) -> Result<Deleted> {
        let manifest = self.layout.manifest(id);
        match self.store.inner().delete(&manifest).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(BackupError::store(self.store.describe(&manifest), e)),
        }
        let mut freed = 0;
        for meta in objects.iter().filter(|m| m.location != manifest) {
            match self.store.inner().delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => freed += meta.size,
                Err(e) => {
                    tracing::warn!(
                        snapshot_id = id,
                        object = %meta.location,
                        error = %e,
                        "snapshot uncommitted but an object remains; garbage collection will remove it"
                    );
                }
            }
        }
        freed += objects
            .iter()
            .filter(|m| m.location == manifest)
            .map(|m| m.size)
            .sum::<u64>();
        // Deltas follow their base snapshot: without it they restore nothing.
        let (deleted_segments, delta_bytes) = match self.delete_segments(id).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(snapshot_id = id, error = %e, "deleting the snapshot's delta segments failed; the next retention run retries");
                (0, 0)
            }
        };
        Ok(Deleted {
            id: id.to_owned(),
            freed_bytes: freed + delta_bytes,
            deleted_segments,
        })
    }

    /// Applies the retention `policy` at `now` and removes leftovers older
    /// than the grace period.
    pub async fn apply_retention(
        &self,
        policy: &RetentionPolicy,
        now: DateTime<Utc>,
    ) -> Result<RetentionOutcome> {
        let scan = self.scan().await?;
        let candidates: Vec<Candidate> = scan
            .snapshots
            .iter()
            .map(|s| Candidate {
                id: s.manifest.id.clone(),
                time: s.manifest.started_at,
                valid: s.is_valid(),
            })
            .collect();
        let keep = policy.keep(now, &candidates);
        let mut outcome = RetentionOutcome {
            kept: keep.len(),
            ..Default::default()
        };
        for s in &scan.snapshots {
            let id = &s.manifest.id;
            if keep.contains(id) {
                continue;
            }
            let objects = scan.objects.get(id).cloned().unwrap_or_default();
            match self.remove_snapshot(id, &objects).await {
                Ok(_) => outcome.deleted.push(id.clone()),
                Err(e) => {
                    tracing::warn!(snapshot_id = %id, error = %e, "retention could not delete")
                }
            }
        }
        // Segments whose base snapshot is gone (deleted by an older
        // version, or its segment deletion failed) restore nothing.
        match self.list_segments(None).await {
            Ok(segments) => {
                let orphaned: std::collections::BTreeSet<&str> = segments
                    .iter()
                    .map(|s| s.base_snapshot.as_str())
                    .filter(|b| {
                        !scan.snapshots.iter().any(|s| s.manifest.id == *b)
                            || outcome.deleted.iter().any(|d| d == b)
                    })
                    .collect();
                for base in orphaned {
                    if let Err(e) = self.delete_segments(base).await {
                        tracing::warn!(base, error = %e, "retention could not delete delta segments");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention could not list delta segments"),
        }
        let garbage = self.collect_garbage(now, false).await?;
        outcome.garbage = garbage.clone();
        outcome.collected = garbage.collected_uploads();
        if let Some(dir) = self.store.local_dir() {
            let root = dir.join(self.layout.full_dir().as_ref());
            let grace = self.gc_grace_period;
            let removed = tokio::task::spawn_blocking(move || remove_stale_staging(&root, grace))
                .await
                .unwrap_or(0);
            if removed > 0 {
                tracing::info!(removed, "removed stale partial uploads from the file store");
            }
        }
        if !outcome.deleted.is_empty() || !outcome.collected.is_empty() {
            tracing::info!(
                deleted = ?outcome.deleted,
                collected = ?outcome.collected,
                kept = outcome.kept,
                "retention applied"
            );
        }
        Ok(outcome)
    }
}

/// A `file://` store's interrupted uploads live as `<object>#<n>` staging
/// files that listings do not show; remove those older than `grace`.
fn remove_stale_staging(dir: &std::path::Path, grace: Duration) -> usize {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            removed += remove_stale_staging(&path, grace);
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains('#'))
            && meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > grace)
            && std::fs::remove_file(&path).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Why cluster `live` is foreign to a store whose snapshots are of
/// `snapshot_clusters` and whose finished restores made `restored`
/// (`None`: it is not).
fn foreign_cluster(live: u64, snapshot_clusters: &[u64], restored: &[u64]) -> Option<String> {
    if snapshot_clusters.is_empty() || snapshot_clusters.contains(&live) || restored.contains(&live)
    {
        return None;
    }
    Some(format!(
        "etcd is cluster {live:016x}, which no snapshot in this store is of and no restore \
         from it made (a new, empty cluster?): scheduled snapshots are held"
    ))
}

#[cfg(test)]
mod tests {
    use super::foreign_cluster;

    #[test]
    fn a_cluster_is_foreign_only_to_a_history_it_is_not_part_of() {
        // An empty store: any cluster starts its history.
        assert_eq!(foreign_cluster(7, &[], &[]), None);
        // The cluster the snapshots are of.
        assert_eq!(foreign_cluster(7, &[9, 7], &[]), None);
        // A cluster a finished restore from this store made.
        assert_eq!(foreign_cluster(8, &[7], &[8]), None);
        let why = foreign_cluster(0xab, &[7], &[8]).expect("foreign");
        assert!(why.contains("00000000000000ab"), "{why}");
        assert!(why.contains("held"), "{why}");
    }
}
