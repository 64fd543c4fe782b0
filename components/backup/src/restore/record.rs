//! `<cluster>/restores/<restore id>.json`: each restore as its coordinator
//! records it, in the store so every instance (and a restarted one) can
//! read it. While it runs the record is rewritten at every phase and node
//! step (state, phase, timings, each node's last step:
//! `bulwarkctl restore status`); when it ends it says done, failed (and
//! whether every node was rolled back) or dry run. A done record is the
//! restore point: snapshots and deltas taken before it describe the
//! abandoned timeline, and coverage shown in status starts again from the
//! restored revision.

use std::sync::Arc;

use bulwark_api::backup::v1 as pb;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::timeline::Timelines;
use crate::delta::SegmentMeta;
use crate::engine::Engine;
use crate::error::{BackupError, Corruption, Result};
use crate::snapshot::manifest::{Manifest, timestamp};

/// Directory of the records, under the cluster's root.
const RESTORES_DIR: &str = "restores";

/// Where a recorded restore stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Its coordinator works on it (or died while it did).
    Running,
    /// Finished at the target. Records written before the state was kept
    /// (only finished restores were recorded then) read as done.
    #[default]
    Done,
    /// Failed; `rolled_back` says whether every node is as it was.
    Failed,
    /// A dry run that finished; nothing was changed.
    DryRun,
}

/// One phase's (node empty) or one node step's time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimingRecord {
    /// The phase or step, as `restore phase finished` logs it.
    pub name: String,
    /// The node, for a step.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Seconds taken.
    pub seconds: f64,
}

/// One node's last step, as the coordinator heard of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Node name.
    pub node: String,
    /// `NodeStep` label, e.g. `restore_snapshot`.
    pub step: String,
    /// `StepStatus` label, e.g. `done`.
    pub status: String,
    /// Detail (error text on failure).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Path kept or created by the step.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// When, by the coordinator's clock.
    pub at: DateTime<Utc>,
}

/// One restore.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRecord {
    /// Restore id.
    pub restore_id: String,
    /// Where it stands.
    #[serde(default)]
    pub state: RecordState,
    /// When it started (unset in records from before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended; for a done restore, when the restored cluster
    /// answered at the target. Unset while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// When the record was last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// `RestorePhase` label of the phase it is in or ended in.
    #[serde(default)]
    pub phase: String,
    /// The snapshot restored from (empty before the plan chose it).
    #[serde(default)]
    pub snapshot_id: String,
    /// The revision restored to (before any bump); 0 until known.
    #[serde(default)]
    pub revision: i64,
    /// The restored cluster's etcd id.
    #[serde(default)]
    pub cluster_id: u64,
    /// The etcd id of the cluster the base snapshot came from, which names
    /// the timeline restored from; 0 in records from before it was kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub from_cluster_id: u64,
    /// Node name of the coordinating instance.
    pub coordinated_by: String,
    /// A failed restore's message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Failed: whether every node was put back as it was.
    #[serde(default)]
    pub rolled_back: bool,
    /// Each finished phase's and node step's time, in order.
    #[serde(default)]
    pub timings: Vec<TimingRecord>,
    /// Each node's last step.
    #[serde(default)]
    pub nodes: Vec<NodeRecord>,
    /// While a point-in-time target is built: how far the replay is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub progress: String,
}

/// `RESTORE_PHASE_PREPARE` from `prepare`.
pub(crate) fn phase_from_label(label: &str) -> pb::RestorePhase {
    pb::RestorePhase::from_str_name(&format!("RESTORE_PHASE_{}", label.to_uppercase()))
        .unwrap_or(pb::RestorePhase::Unspecified)
}

fn enum_from_label<E>(prefix: &str, label: &str, parse: fn(&str) -> Option<E>) -> Option<E> {
    parse(&format!("{prefix}{}", label.to_uppercase()))
}

impl RestoreRecord {
    /// A running restore's first record.
    pub fn started(restore_id: &str, coordinated_by: &str, at: DateTime<Utc>) -> Self {
        Self {
            restore_id: restore_id.to_owned(),
            state: RecordState::Running,
            started_at: Some(at),
            finished_at: None,
            updated_at: Some(at),
            phase: String::new(),
            snapshot_id: String::new(),
            revision: 0,
            cluster_id: 0,
            from_cluster_id: 0,
            coordinated_by: coordinated_by.to_owned(),
            error: String::new(),
            rolled_back: false,
            timings: Vec::new(),
            nodes: Vec::new(),
            progress: String::new(),
        }
    }

    /// Records `ev` as its node's last step.
    pub fn node_event(&mut self, ev: &pb::NodeRestoreProgress) {
        let label = |name: &str, prefix: &str| name.trim_start_matches(prefix).to_lowercase();
        let row = NodeRecord {
            node: ev.node_name.clone(),
            step: pb::NodeStep::try_from(ev.step)
                .map(|s| label(s.as_str_name(), "NODE_STEP_"))
                .unwrap_or_else(|_| ev.step.to_string()),
            status: pb::StepStatus::try_from(ev.status)
                .map(|s| label(s.as_str_name(), "STEP_STATUS_"))
                .unwrap_or_else(|_| ev.status.to_string()),
            detail: ev.detail.clone(),
            path: ev.path.clone(),
            at: Utc::now(),
        };
        match self.nodes.iter_mut().find(|n| n.node == row.node) {
            Some(n) => *n = row,
            None => self.nodes.push(row),
        }
    }

    /// `timings` from the coordinator's clock.
    pub fn set_timings(&mut self, timings: &[pb::PhaseTiming]) {
        self.timings = timings
            .iter()
            .map(|t| TimingRecord {
                name: t.name.clone(),
                node: t.node_name.clone(),
                seconds: t
                    .took
                    .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
                    .unwrap_or(0.0),
            })
            .collect();
    }

    /// The record as `Backup.GetRestore` answers it.
    pub fn to_proto(&self) -> pb::RestoreRecord {
        pb::RestoreRecord {
            restore_id: self.restore_id.clone(),
            coordinator: self.coordinated_by.clone(),
            state: match self.state {
                RecordState::Running => pb::RestoreState::Running,
                RecordState::Done => pb::RestoreState::Done,
                RecordState::Failed => pb::RestoreState::Failed,
                RecordState::DryRun => pb::RestoreState::DryRun,
            } as i32,
            started_at: self.started_at.map(timestamp),
            finished_at: self.finished_at.map(timestamp),
            updated_at: self.updated_at.map(timestamp),
            phase: phase_from_label(&self.phase) as i32,
            snapshot_id: self.snapshot_id.clone(),
            revision: self.revision,
            error: self.error.clone(),
            rolled_back: self.rolled_back,
            timings: self
                .timings
                .iter()
                .map(|t| pb::PhaseTiming {
                    name: t.name.clone(),
                    node_name: t.node.clone(),
                    took: bulwark_api::time::duration_to_proto(
                        std::time::Duration::try_from_secs_f64(t.seconds).unwrap_or_default(),
                    )
                    .ok(),
                })
                .collect(),
            nodes: self
                .nodes
                .iter()
                .map(|n| pb::RestoreNodeProgress {
                    node_name: n.node.clone(),
                    step: enum_from_label("NODE_STEP_", &n.step, pb::NodeStep::from_str_name)
                        .unwrap_or(pb::NodeStep::Unspecified) as i32,
                    status: enum_from_label(
                        "STEP_STATUS_",
                        &n.status,
                        pb::StepStatus::from_str_name,
                    )
                    .unwrap_or(pb::StepStatus::Unspecified) as i32,
                    detail: n.detail.clone(),
                    path: n.path.clone(),
                    at: Some(timestamp(n.at)),
                })
                .collect(),
            cluster_id: self.cluster_id,
            progress: self.progress.clone(),
        }
    }
}

impl Engine {
    fn restore_record_path(&self, restore_id: &str) -> object_store::path::Path {
        self.layout
            .root()
            .clone()
            .join(RESTORES_DIR)
            .join(format!("{restore_id}.json"))
    }

    /// Stores `record`, replacing the restore's earlier one.
    pub async fn record_restore(&self, record: &RestoreRecord) -> Result<()> {
        let path = self.restore_record_path(&record.restore_id);
        let body = serde_json::to_vec_pretty(record).unwrap_or_default();
        self.store
            .inner()
            .put(&path, PutPayload::from(body))
            .await
            .map(drop)
            .map_err(|e| BackupError::store(self.store.describe(&path), e))
    }

    /// Every record's object, newest first (restore ids start with their
    /// UTC time).
    async fn restore_objects(&self) -> Result<Vec<object_store::path::Path>> {
        let dir = self.layout.root().clone().join(RESTORES_DIR);
        let mut objects: Vec<_> = self
            .store
            .inner()
            .list(Some(&dir))
            .map_ok(|o| o.location)
            .try_collect()
            .await
            .map_err(|e| BackupError::store(self.store.describe(&dir), e))?;
        objects.retain(|o| o.as_ref().ends_with(".json"));
        objects.sort_by(|a, b| b.as_ref().cmp(a.as_ref()));
        Ok(objects)
    }

    async fn read_restore_record(&self, path: &object_store::path::Path) -> Result<RestoreRecord> {
        let bytes = self
            .store
            .inner()
            .get(path)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => BackupError::NotFound {
                    what: format!("restore record {path}"),
                },
                e => BackupError::store(self.store.describe(path), e),
            })?
            .bytes()
            .await
            .map_err(|e| BackupError::store(self.store.describe(path), e))?;
        serde_json::from_slice(&bytes).map_err(|e| BackupError::Corrupt {
            kind: Corruption::Manifest,
            what: path.to_string(),
            detail: e.to_string(),
        })
    }

    /// One restore's record.
    pub async fn restore_record(&self, restore_id: &str) -> Result<RestoreRecord> {
        if !crate::store::layout::is_valid_id(restore_id) {
            return Err(BackupError::InvalidArgument(format!(
                "restore_id {:?}: expected letters, digits, '-' or '_'",
                restore_id.chars().take(64).collect::<String>()
            )));
        }
        self.read_restore_record(&self.restore_record_path(restore_id))
            .await
    }

    /// Every restore's record, newest start first (ids carry their time
    /// only to the second); an unreadable one is logged and left out.
    pub async fn restore_records(&self) -> Result<Vec<RestoreRecord>> {
        let mut out = Vec::new();
        for path in self.restore_objects().await? {
            match self.read_restore_record(&path).await {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(object = %path, error = %e, "unreadable restore record"),
            }
        }
        let start = |r: &RestoreRecord| r.started_at.or(r.finished_at);
        out.sort_by(|a, b| {
            start(b)
                .cmp(&start(a))
                .then_with(|| b.restore_id.cmp(&a.restore_id))
        });
        Ok(out)
    }

    /// Every timeline of this cluster's store ([`Timelines`]).
    pub async fn timelines(&self) -> Result<Timelines> {
        let snapshots = self.list_snapshots().await?;
        self.timelines_for(snapshots.iter().map(|e| &e.manifest))
            .await
    }

    /// [`Self::timelines`] with the snapshots present already listed
    /// (their clusters without a record are back-filled).
    pub async fn timelines_for<'a>(
        &self,
        snapshots: impl IntoIterator<Item = &'a Manifest>,
    ) -> Result<Timelines> {
        Ok(self.restore_point_and_timelines(snapshots).await?.1)
    }

    /// The newest restore that finished at its target ([`last_done`]) and
    /// the timelines, from one read of the restore records.
    pub async fn restore_point_and_timelines<'a>(
        &self,
        snapshots: impl IntoIterator<Item = &'a Manifest>,
    ) -> Result<(Option<RestoreRecord>, Timelines)> {
        let records = self.restore_records().await?;
        let clusters = self.seen_clusters(snapshots).await?;
        Ok((
            last_done(&records).cloned(),
            Timelines::new(&records, &clusters),
        ))
    }
}

/// The newest restore that finished at its target (not a failed, running
/// or dry-run one) of `records`, newest first as
/// [`Engine::restore_records`] returns them.
pub fn last_done(records: &[RestoreRecord]) -> Option<&RestoreRecord> {
    records
        .iter()
        .find(|r| r.state == RecordState::Done && r.finished_at.is_some())
}

/// Keeps a running restore's record in the store up to date without
/// holding up the restore: a task writes the newest version whenever it
/// changes (versions written while a write is under way coalesce), and
/// stops after writing one that is no longer running.
#[derive(Debug)]
pub(super) struct RecordWriter {
    tx: watch::Sender<RestoreRecord>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl RecordWriter {
    /// Writes `first` now, and every update after it.
    pub(super) fn start(engine: Arc<Engine>, first: RestoreRecord) -> Self {
        let (tx, mut rx) = watch::channel(first);
        let task = tokio::spawn(async move {
            loop {
                let record = rx.borrow_and_update().clone();
                if let Err(e) = engine.record_restore(&record).await {
                    tracing::warn!(restore_id = %record.restore_id, error = %e, "could not store the restore's record: `restore status` shows an older state");
                }
                if record.state != RecordState::Running || rx.changed().await.is_err() {
                    break;
                }
            }
        });
        Self {
            tx,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Changes the record; the change is written soon.
    pub(super) fn update(&self, f: impl FnOnce(&mut RestoreRecord)) {
        self.tx.send_modify(|r| {
            f(r);
            r.updated_at = Some(Utc::now());
        });
    }

    /// Changes the record to its final state and waits until it is written.
    pub(super) async fn finish(&self, f: impl FnOnce(&mut RestoreRecord)) {
        self.update(f);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
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
        && let Some(finished) = r.finished_at
        && latest.is_none_or(|m| m.started_at < finished)
    {
        return Some(r.revision);
    }
    latest.map(|m| {
        crate::delta::check_continuity(m.revision, segments)
            .unwrap_or(m.revision)
            .max(m.revision_max)
    })
}

fn is_zero(v: &u64) -> bool {
    *v == 0
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
        let mut restore = RestoreRecord::started("r", "cp-1", snap.started_at);
        restore.state = RecordState::Done;
        restore.finished_at = Some(snap.started_at + chrono::Duration::minutes(5));
        restore.snapshot_id = "s".into();
        restore.revision = 104;
        restore.cluster_id = 7;
        assert_eq!(
            covered_revision(Some(&snap), &deltas, Some(&restore)),
            Some(104)
        );
        assert_eq!(covered_revision(None, &[], Some(&restore)), Some(104));

        // A snapshot of the restored cluster: coverage grows from it.
        let mut after = sample();
        after.started_at = snap.started_at + chrono::Duration::minutes(6);
        after.revision = 1_000_120;
        after.revision_max = 1_000_120;
        let deltas = [segment(1_000_121, 1_000_130)];
        assert_eq!(
            covered_revision(Some(&after), &deltas, Some(&restore)),
            Some(1_000_130)
        );
        assert_eq!(covered_revision(None, &[], None), None);
        // A restore that did not finish is no restore point.
        let mut failed = restore.clone();
        failed.finished_at = None;
        assert_eq!(
            covered_revision(Some(&snap), &[segment(151, 205)], Some(&failed)),
            Some(205)
        );
    }

    /// Records from before the state was kept (only finished restores
    /// were written) read as done; a running one says where it is.
    #[test]
    fn records_read_back_old_and_new() {
        let old = r#"{"restoreId":"r0","finishedAt":"2026-11-28T10:00:00Z","snapshotId":"s",
            "revision":104,"clusterId":7,"coordinatedBy":"cp-1"}"#;
        let r: RestoreRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.state, RecordState::Done);
        assert!(r.finished_at.is_some() && r.started_at.is_none());
        assert_eq!(r.to_proto().state, pb::RestoreState::Done as i32);

        let mut running = RestoreRecord::started("r1", "cp-2", Utc::now());
        running.phase = "restore_members".into();
        running.node_event(&pb::NodeRestoreProgress {
            node_name: "cp-3".into(),
            step: pb::NodeStep::MoveDataDirAside as i32,
            status: pb::StepStatus::Done as i32,
            path: "/var/lib/etcd.bulwark-r1".into(),
            ..Default::default()
        });
        running.node_event(&pb::NodeRestoreProgress {
            node_name: "cp-3".into(),
            step: pb::NodeStep::RestoreSnapshot as i32,
            status: pb::StepStatus::Started as i32,
            ..Default::default()
        });
        running.set_timings(&[pb::PhaseTiming {
            name: "plan".into(),
            node_name: String::new(),
            took: Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000,
            }),
        }]);
        let json = serde_json::to_string(&running).unwrap();
        assert!(json.contains(r#""state":"running""#), "{json}");
        let back: RestoreRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, running);
        let p = back.to_proto();
        assert_eq!(p.state, pb::RestoreState::Running as i32);
        assert_eq!(p.phase, pb::RestorePhase::RestoreMembers as i32);
        assert_eq!(p.nodes.len(), 1, "one row per node: its last step");
        assert_eq!(p.nodes[0].step, pb::NodeStep::RestoreSnapshot as i32);
        assert_eq!(p.nodes[0].status, pb::StepStatus::Started as i32);
        let took = p.timings[0].took.unwrap();
        assert_eq!((took.seconds, took.nanos), (1, 500_000_000));
    }
}
