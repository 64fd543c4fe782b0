//! `<cluster>/clusters/<etcd cluster id>.json`: every etcd cluster whose
//! snapshots this store has held, written down once.
//!
//! Timelines (`restore/timeline.rs`) are numbered in the order histories
//! began. The restore records say which etcd clusters a restore made; every
//! other cluster is a history of its own: the original one, or a cluster
//! rebuilt outside bulwark (`etcdutl snapshot restore` by hand, a new
//! kubeadm cluster) whose revisions restart or overlap the old ones. The
//! snapshots alone cannot number those: retention deletes the oldest, and
//! the order read from what is left would change. So each cluster id gets
//! a record when the first snapshot of it is committed (or, for a cluster
//! a restore made, when that restore finishes), written with create-only
//! semantics so the first writer wins, and never deleted: retention deletes
//! only `full/<id>/` and `delta/<id>/`, and garbage collection looks only
//! under `full/`, `delta/` and `restore/`.
//!
//! Delta segments need no record of their own: the recorder follows only
//! the newest snapshot, and stops at a snapshot of another cluster, so a
//! segment's cluster is always its base snapshot's, already on record.
//!
//! Back-fill: a store written before these records (or a crash between a
//! manifest and its record) holds snapshots whose cluster has no record.
//! Such a cluster counts as seen at its oldest snapshot present
//! ([`back_fill`]), and the next committed snapshot writes that down, so it
//! stops moving as retention deletes.

use chrono::{DateTime, Utc};
use object_store::{ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::{BackupError, Corruption, Result};
use crate::snapshot::manifest::Manifest;

/// One etcd cluster backups have seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    /// etcd's cluster id, written as 16 hex digits like manifests do.
    #[serde(with = "hex_id")]
    pub cluster_id: u64,
    /// When it was first seen: its first snapshot's start, or when the
    /// restore that made it finished.
    pub first_seen_at: DateTime<Utc>,
    /// The revision of that snapshot, or the revision the restore restored.
    pub first_revision: i64,
    /// That snapshot (empty for a record a restore wrote).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub first_snapshot_id: String,
    /// The restore that made the cluster, when one did. Timelines go by
    /// the restore records themselves; this tells a reader of the store.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub restore_id: String,
    /// Written from the snapshots present rather than at the first commit
    /// (a store from before these records): the first sight is the oldest
    /// snapshot that was left.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub back_filled: bool,
}

impl ClusterRecord {
    /// The record a snapshot's commit writes when it is `m`'s first.
    pub fn from_snapshot(m: &Manifest) -> Self {
        Self {
            cluster_id: m.cluster_id(),
            first_seen_at: m.started_at,
            first_revision: m.revision,
            first_snapshot_id: m.id.clone(),
            restore_id: String::new(),
            back_filled: false,
        }
    }
}

/// Serializes a cluster id as manifests write it.
mod hex_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{id:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(|e| {
            serde::de::Error::custom(format!(
                "clusterId {text:?}: not a hex etcd cluster id: {e}"
            ))
        })
    }
}

/// Records for the clusters of `snapshots` that `recorded` lacks, each
/// seen at its oldest snapshot there (`back_filled`). Snapshots without a
/// readable cluster id (0) are left out.
pub fn back_fill<'a>(
    recorded: &[ClusterRecord],
    snapshots: impl IntoIterator<Item = &'a Manifest>,
) -> Vec<ClusterRecord> {
    let mut oldest: std::collections::BTreeMap<u64, &Manifest> = Default::default();
    for m in snapshots {
        let id = m.cluster_id();
        if id == 0 || recorded.iter().any(|r| r.cluster_id == id) {
            continue;
        }
        let slot = oldest.entry(id).or_insert(m);
        if (m.started_at, &m.id) < (slot.started_at, &slot.id) {
            *slot = m;
        }
    }
    oldest
        .into_values()
        .map(|m| ClusterRecord {
            back_filled: true,
            ..ClusterRecord::from_snapshot(m)
        })
        .collect()
}

impl Engine {
    /// The cluster records in the store, oldest first sight first; an
    /// unreadable one is logged and left out.
    pub async fn cluster_records(&self) -> Result<Vec<ClusterRecord>> {
        let metas = self.store.list_all(&self.layout.clusters_dir()).await?;
        let mut out = Vec::new();
        for meta in metas
            .iter()
            .filter(|m| m.location.as_ref().ends_with(".json"))
        {
            match self.read_cluster_record(&meta.location).await {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(object = %meta.location, error = %e, "unreadable cluster record")
                }
            }
        }
        out.sort_by_key(|r| (r.first_seen_at, r.cluster_id));
        Ok(out)
    }

    async fn read_cluster_record(&self, path: &object_store::path::Path) -> Result<ClusterRecord> {
        let bytes = self.get_bytes(path).await?;
        serde_json::from_slice(&bytes).map_err(|e| BackupError::Corrupt {
            kind: Corruption::Manifest,
            what: self.store.describe(path),
            detail: e.to_string(),
        })
    }

    /// Every cluster seen: the records, and [`back_fill`] for the clusters
    /// of `snapshots` without one.
    pub async fn seen_clusters<'a>(
        &self,
        snapshots: impl IntoIterator<Item = &'a Manifest>,
    ) -> Result<Vec<ClusterRecord>> {
        let mut seen = self.cluster_records().await?;
        seen.extend(back_fill(&seen, snapshots));
        Ok(seen)
    }

    /// Writes `record` unless its cluster has one already (the first
    /// writer wins; a record is never replaced). True when this call wrote
    /// it.
    pub async fn record_cluster(&self, record: &ClusterRecord) -> Result<bool> {
        let path = self.layout.cluster_record(record.cluster_id);
        let described = self.store.describe(&path);
        match self.store.inner().head(&path).await {
            Ok(_) => return Ok(false),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(BackupError::store(described, e)),
        }
        let body = serde_json::to_vec_pretty(record).unwrap_or_default();
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let put = self
            .store
            .inner()
            .put_opts(&path, PutPayload::from(body.clone()), create)
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            // A store without create-only puts (some S3 look-alikes): the
            // look-up above already kept an existing record, and one put
            // is still atomic.
            Err(object_store::Error::NotImplemented { .. }) => self
                .store
                .inner()
                .put(&path, PutPayload::from(body))
                .await
                .map(|_| true)
                .map_err(|e| BackupError::store(described, e)),
            Err(e) => Err(BackupError::store(described, e)),
        }
    }

    /// After `committed`'s commit: when its cluster has no record yet,
    /// writes one, with the back-fill of every other cluster of the
    /// snapshots present that lacks one (a store from an older version).
    /// One look-up when the cluster is on record already.
    pub async fn note_cluster(&self, committed: &Manifest) -> Result<()> {
        let id = committed.cluster_id();
        if id == 0 {
            return Ok(());
        }
        let path = self.layout.cluster_record(id);
        match self.store.inner().head(&path).await {
            Ok(_) => return Ok(()),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(BackupError::store(self.store.describe(&path), e)),
        }
        let recorded = self.cluster_records().await?;
        let snapshots: Vec<Manifest> = self
            .list_snapshots()
            .await?
            .into_iter()
            .map(|e| e.manifest)
            .collect();
        let mut missing = back_fill(&recorded, &snapshots);
        // Listed before the commit showed up, or its cluster's only one:
        // either way it is this cluster's first sight unless an older
        // snapshot of it is present.
        match missing.iter_mut().find(|r| r.cluster_id == id) {
            Some(r) if r.first_snapshot_id == committed.id => r.back_filled = false,
            Some(_) => {}
            None => missing.push(ClusterRecord::from_snapshot(committed)),
        }
        for record in &missing {
            if self.record_cluster(record).await? {
                tracing::info!(
                    cluster_id = %format!("{:016x}", record.cluster_id),
                    first_revision = record.first_revision,
                    back_filled = record.back_filled,
                    "etcd cluster recorded"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::manifest::tests::sample;

    fn snap(id: &str, cluster: u64, minute: i64, revision: i64) -> Manifest {
        let mut m = sample();
        m.id = id.into();
        m.etcd.cluster_id = format!("{cluster:016x}");
        m.started_at = sample().started_at + chrono::Duration::minutes(minute);
        m.revision = revision;
        m
    }

    #[test]
    fn records_read_back_with_the_id_as_manifests_write_it() {
        let r = ClusterRecord::from_snapshot(&snap("s1", 0xcdf8_1819_4e3a_8c32, 0, 42));
        let json = String::from_utf8(serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(json.contains(r#""clusterId":"cdf818194e3a8c32""#), "{json}");
        assert!(!json.contains("backFilled"), "{json}");
        assert_eq!(serde_json::from_str::<ClusterRecord>(&json).unwrap(), r);
        let bad = json.replace("cdf818194e3a8c32", "not-hex");
        let err = serde_json::from_str::<ClusterRecord>(&bad).unwrap_err();
        assert!(err.to_string().contains("clusterId"), "{err}");
    }

    #[test]
    fn back_fill_takes_each_unrecorded_cluster_at_its_oldest_snapshot() {
        let snapshots = [
            snap("a2", 0xa, 20, 300),
            snap("b1", 0xb, 30, 12),
            snap("a1", 0xa, 10, 200),
            snap("z", 0, 5, 1),
        ];
        let filled = back_fill(&[], &snapshots);
        assert_eq!(filled.len(), 2, "{filled:?}");
        assert_eq!(
            (filled[0].cluster_id, filled[0].first_snapshot_id.as_str()),
            (0xa, "a1")
        );
        assert_eq!(filled[0].first_revision, 200);
        assert!(filled.iter().all(|r| r.back_filled));
        // A recorded cluster keeps its record, however its snapshots age.
        let recorded = [ClusterRecord::from_snapshot(&snap("a0", 0xa, 0, 100))];
        let filled = back_fill(&recorded, &snapshots);
        assert_eq!(filled.len(), 1);
        assert_eq!(filled[0].cluster_id, 0xb);
    }
}
