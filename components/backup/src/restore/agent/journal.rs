//! The agent's journal: `<dataDir>.bulwark-<restore id>.journal`, next to
//! the set-aside dirs, rewritten (a synced temporary file renamed over it,
//! then the directory synced) before the step it names changes anything
//! and after it did. When the member started healthy the journal moves
//! to `restore.stateDir/<restore id>/journal.json`: the node then answers
//! for that restore as restored (GetRestoreState), starts it again
//! (StartMember) or undoes it (AbortRestore), so a coordinator that
//! resumes a restore some of whose members had finished before it died
//! neither mistakes them for untouched nodes nor leaves them restored
//! while it rolls the others back. A rollback removes both journals. A
//! restarted agent ([`Agent::recover`]) reads the active one, checks every path it names against
//! the disk (a kill can fall between a rename and the journal's update),
//! and then:
//!
//! - nothing of etcd's was touched yet (prepared only): releases the node;
//! - the member was being restored (manifest or data dir moved, the tool
//!   ran, nothing restored yet): rolls the node back on its own, as the
//!   coordinator does for a node whose restore step broke off;
//! - the member is restored (started or not): holds the node for the
//!   coordinator, which resumes it (StartMember) or rolls it back
//!   (AbortRestore) with every other node, so the cluster ends either
//!   restored or original, never part of each (`bulwarkctl restore
//!   resume|rollback ID` when the coordinator is gone too).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::disk::aside_path;
use super::{Agent, Held, Member};
use crate::error::{BackupError, Result};

/// The journal's suffix after `<dataDir>.bulwark-<restore id>`.
const SUFFIX: &str = ".journal";

/// How long a recovered, restored node waits for its coordinator before
/// its lock may be taken over (never rolled back on its own: see above).
const RECOVERED_HOLD: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecEntry {
    object_key: String,
    sha256: String,
    size_bytes: u64,
    /// Set when the node decoded the stored snapshot itself.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    snapshot_id: String,
    #[serde(default)]
    raw_size_bytes: u64,
    /// Set when the node fetched a target the coordinator's node served.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    served_by: String,
    member_name: String,
    peer_urls: Vec<String>,
    initial_cluster: String,
    cluster_token: String,
    bump_revision: u64,
    mark_compacted: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MemberEntry {
    name: String,
    peer_urls: Vec<String>,
    client_urls: Vec<String>,
    data_dir: PathBuf,
}

/// One journal: everything [`Held`] knows, in a form that survives the
/// process.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    restore_id: String,
    spec: SpecEntry,
    member: MemberEntry,
    staged: PathBuf,
    manifest_aside: PathBuf,
    data_aside: PathBuf,
    manifest_moved: bool,
    data_moved: bool,
    partial: bool,
    /// The prebuilt member is complete (written after the tool succeeded;
    /// absent from older agents' journals).
    #[serde(default)]
    prebuilt: bool,
    restored: bool,
    started: bool,
    /// `NodeStep` name of the step under way or last done.
    last_step: String,
    written_at: DateTime<Utc>,
}

impl Entry {
    fn of(h: &Held) -> Self {
        let source = h.spec.snapshot.clone().unwrap_or_default();
        Self {
            restore_id: h.restore_id.clone(),
            spec: SpecEntry {
                object_key: source.object_key,
                sha256: source.sha256,
                size_bytes: source.size_bytes,
                snapshot_id: source.snapshot_id,
                raw_size_bytes: source.raw_size_bytes,
                served_by: source.served_by,
                member_name: h.spec.member_name.clone(),
                peer_urls: h.spec.peer_urls.clone(),
                initial_cluster: h.spec.initial_cluster.clone(),
                cluster_token: h.spec.cluster_token.clone(),
                bump_revision: h.spec.bump_revision,
                mark_compacted: h.spec.mark_compacted,
            },
            member: MemberEntry {
                name: h.member.name.clone(),
                peer_urls: h.member.peer_urls.clone(),
                client_urls: h.member.client_urls.clone(),
                data_dir: h.member.data_dir.clone(),
            },
            staged: h.staged.clone(),
            manifest_aside: h.manifest_aside.clone(),
            data_aside: h.data_aside.clone(),
            manifest_moved: h.manifest_moved,
            data_moved: h.data_moved,
            partial: h.partial,
            prebuilt: h.prebuilt,
            restored: h.restored,
            started: h.started,
            last_step: h.last_step.as_str_name().to_owned(),
            written_at: Utc::now(),
        }
    }

    /// The held state the journal describes, checked against the disk:
    /// each flag is what the paths show, not what was last written.
    fn into_held(self, manifest: &Path) -> Held {
        let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        let data_dir = self.member.data_dir.clone();
        let partial_path = aside_path(&data_dir, &self.restore_id, "-partial");
        let prebuilt =
            self.prebuilt && exists(&aside_path(&data_dir, &self.restore_id, super::PREBUILT));
        let manifest_moved = !exists(manifest) && exists(&self.manifest_aside);
        // The tool's output renamed into place is the only way a data dir
        // appears once the tool began (the manifest is out, etcd is down).
        let tool_began = self.partial || self.restored;
        let restored = tool_began && exists(&data_dir);
        Held {
            restore_id: self.restore_id,
            spec: pb::MemberRestoreSpec {
                snapshot: Some(pb::SnapshotSource {
                    object_key: self.spec.object_key,
                    sha256: self.spec.sha256,
                    size_bytes: self.spec.size_bytes,
                    snapshot_id: self.spec.snapshot_id,
                    raw_size_bytes: self.spec.raw_size_bytes,
                    served_by: self.spec.served_by,
                }),
                member_name: self.spec.member_name,
                peer_urls: self.spec.peer_urls,
                initial_cluster: self.spec.initial_cluster,
                cluster_token: self.spec.cluster_token,
                bump_revision: self.spec.bump_revision,
                mark_compacted: self.spec.mark_compacted,
            },
            member: Member {
                name: self.member.name,
                peer_urls: self.member.peer_urls,
                client_urls: self.member.client_urls,
                data_dir,
            },
            staged: self.staged,
            manifest_aside: self.manifest_aside,
            data_moved: exists(&self.data_aside),
            data_aside: self.data_aside,
            manifest_moved,
            partial: exists(&partial_path),
            // Complete only if the journal said so after the tool: a
            // killed tool's output is removed by the rollback.
            prebuilt,
            restored,
            started: restored && !manifest_moved,
            last_step: pb::NodeStep::from_str_name(&self.last_step)
                .unwrap_or(pb::NodeStep::Unspecified),
            last_status: pb::StepStatus::Started,
            error: String::new(),
            expires: Instant::now() + RECOVERED_HOLD,
        }
    }
}

/// The journal of `restore_id` for the member whose data dir is `data_dir`.
fn path_for(data_dir: &Path, restore_id: &str) -> PathBuf {
    aside_path(data_dir, restore_id, SUFFIX)
}

/// Syncs the directory holding `path`, so a rename or removal in it
/// survives a crash.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn write_entry(path: &Path, entry: &Entry) -> std::io::Result<()> {
    use std::io::Write as _;
    let body = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

fn remove_entry(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Journals next to `data_dir`, newest restore first (ids begin with
/// their UTC time).
fn journals_beside(data_dir: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (data_dir.parent(), data_dir.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.bulwark-", name.to_string_lossy());
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(SUFFIX))
        })
        .collect();
    found.sort();
    found.reverse();
    found
}

impl Agent {
    /// Writes `h` to its journal, synced. A journal that cannot be written
    /// stops the step: a restore this node could not resume or undo after
    /// a crash must not go on.
    pub(super) async fn journal(&self, h: &Held) -> Result<()> {
        let path = path_for(&h.member.data_dir, &h.restore_id);
        let entry = Entry::of(h);
        let p = path.clone();
        tokio::task::spawn_blocking(move || write_entry(&p, &entry))
            .await
            .map_err(|e| BackupError::local("writing the restore journal", e))?
            .map_err(|e| BackupError::local(format!("writing {}", path.display()), e))
    }

    /// Removes `h`'s journals (active and finished) once the node is
    /// released by a rollback.
    pub(super) async fn drop_journal(&self, h: &Held) {
        for path in [
            path_for(&h.member.data_dir, &h.restore_id),
            self.finished_path(&h.restore_id),
        ] {
            let p = path.clone();
            let removed = tokio::task::spawn_blocking(move || remove_entry(&p)).await;
            if !matches!(removed, Ok(Ok(()))) {
                tracing::warn!(path = %path.display(), "could not remove the restore journal");
            }
        }
    }

    fn finished_path(&self, restore_id: &str) -> PathBuf {
        self.config.state_dir.join(restore_id).join("journal.json")
    }

    /// The member started healthy: the journal moves to the state dir,
    /// where it marks the restore finished on this node.
    pub(super) async fn finish_journal(&self, h: &Held) {
        let active = path_for(&h.member.data_dir, &h.restore_id);
        let finished = self.finished_path(&h.restore_id);
        let entry = Entry::of(h);
        let moved = tokio::task::spawn_blocking(move || {
            write_entry(&finished, &entry)?;
            remove_entry(&active)
        })
        .await;
        if !matches!(moved, Ok(Ok(()))) {
            tracing::warn!(restore_id = %h.restore_id, "could not move the restore journal into the state dir");
        }
    }

    /// Restore `restore_id` as it stands on this node after its member
    /// started healthy, if it did.
    pub(super) async fn finished(&self, restore_id: &str) -> Option<Held> {
        if !crate::store::layout::is_valid_id(restore_id) {
            return None;
        }
        let text = tokio::fs::read(self.finished_path(restore_id)).await.ok()?;
        let entry: Entry = serde_json::from_slice(&text).ok()?;
        Some(entry.into_held(&self.config.etcd_manifest))
    }

    /// After a restart: finds this node's journal and resumes, rolls back
    /// or releases as the module header says. Returns the restore id found,
    /// if any. Call it before serving the agent.
    pub async fn recover(&self) -> Result<Option<String>> {
        let found = self.recover_journal().await;
        let keep = self
            .held
            .lock()
            .await
            .as_ref()
            .map(|h| h.restore_id.clone());
        let state_dir = self.config.state_dir.clone();
        // Blocking directory reads, off the runtime.
        let swept =
            tokio::task::spawn_blocking(move || remove_stale_staged(&state_dir, keep.as_deref()))
                .await;
        if let Err(e) = swept {
            tracing::warn!(error = %e, "could not look for staged targets left behind");
        }
        found
    }

    /// The journal part of [`Agent::recover`].
    async fn recover_journal(&self) -> Result<Option<String>> {
        let Some(data_dir) = self.recovery_data_dir().await else {
            return Ok(None);
        };
        let Some(path) = journals_beside(&data_dir).into_iter().next() else {
            return Ok(None);
        };
        let entry: Entry = {
            let text = tokio::fs::read(&path)
                .await
                .map_err(|e| BackupError::local(format!("reading {}", path.display()), e))?;
            serde_json::from_slice(&text).map_err(|e| {
                BackupError::InvalidArgument(format!("restore journal {}: {e}", path.display()))
            })?
        };
        let h = entry.into_held(&self.config.etcd_manifest);
        let rid = h.restore_id.clone();
        let touched = h.manifest_moved || h.data_moved || h.partial || h.restored;
        tracing::warn!(restore_id = %rid, journal = %path.display(), manifest_moved = h.manifest_moved,
            data_moved = h.data_moved, restored = h.restored, started = h.started,
            "restarted during a restore: recovering from the journal");
        *self.held.lock().await = Some(h.clone());
        self.recorder_pause.hold(&rid, h.expires);
        if h.restored {
            // The coordinator (or `bulwarkctl restore resume|rollback`)
            // decides with every other node.
            self.journal(&h).await?;
            return Ok(Some(rid));
        }
        let reason = if touched {
            "the agent restarted while restoring its member; rolling the node back"
        } else {
            "the agent restarted before its member was touched; releasing the node"
        };
        self.abort(&rid, reason, &|_| {}).await?;
        Ok(Some(rid))
    }

    /// The data dir to look for journals beside: from the config, the
    /// manifest in place, or a manifest a restore moved into the state dir.
    async fn recovery_data_dir(&self) -> Option<PathBuf> {
        if let Ok(m) = self.member(None).await {
            return Some(m.data_dir);
        }
        let mut entries = tokio::fs::read_dir(&self.config.state_dir).await.ok()?;
        while let Ok(Some(e)) = entries.next_entry().await {
            let aside = e.path().join("etcd.yaml");
            if aside.exists()
                && let Ok(m) = self.member(Some(&aside)).await
            {
                return Some(m.data_dir);
            }
        }
        None
    }
}

/// Removes the staged targets (`<state dir>/<restore id>/snapshot.db`) an
/// agent killed before it journalled its prepare left behind: a fetch is
/// journalled only once it is complete and checked, so a staged file of a
/// restore this node holds no journal for (`keep` is the one it holds) is
/// a dead fetch's, possibly gigabytes, and nothing will ever read it. A
/// dir holding etcd's manifest set aside is never touched, whatever its
/// journal says; the restore's dir goes too once it is empty. Returns
/// what was removed.
fn remove_stale_staged(state_dir: &Path, keep: Option<&str>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for dir in entries.flatten().map(|e| e.path()) {
        let staged = dir.join(super::STAGED_FILE);
        let held = keep.is_some_and(|k| dir.file_name().is_some_and(|n| n == k));
        if held || dir.join("etcd.yaml").exists() || !staged.is_file() {
            continue;
        }
        let bytes = std::fs::metadata(&staged).map_or(0, |m| m.len());
        match std::fs::remove_file(&staged) {
            Ok(()) => {
                tracing::warn!(path = %staged.display(), bytes,
                    "removed a staged target a killed restore left behind");
                // Only an empty dir goes: a finished restore's journal stays.
                let _ = std::fs::remove_dir(&dir);
                removed.push(staged);
            }
            Err(e) => tracing::warn!(path = %staged.display(), error = %e,
                "could not remove a staged target a killed restore left behind"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(dir: &Path) -> Held {
        Held::staged(
            "r1".into(),
            pb::MemberRestoreSpec {
                snapshot: Some(pb::SnapshotSource {
                    object_key: "k".into(),
                    sha256: "s".into(),
                    size_bytes: 7,
                    snapshot_id: "20250102T030405Z-r42-abcd".into(),
                    raw_size_bytes: 9,
                    served_by: String::new(),
                }),
                member_name: "m1".into(),
                peer_urls: vec!["http://p".into()],
                initial_cluster: "m1=http://p".into(),
                cluster_token: "t".into(),
                bump_revision: 3,
                mark_compacted: true,
            },
            Member {
                name: "m1".into(),
                peer_urls: vec!["http://p".into()],
                client_urls: vec!["http://c".into()],
                data_dir: dir.join("etcd"),
            },
            &dir.join("state/r1"),
            Instant::now(),
        )
    }

    /// The flags come from the disk: a kill between a rename and the
    /// journal's update leaves the journal one step behind.
    #[test]
    fn a_journal_reads_back_as_the_disk_shows() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("manifests/etcd.yaml");
        std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
        std::fs::create_dir_all(dir.path().join("state/r1")).unwrap();
        let mut h = held(dir.path());
        let path = path_for(&h.member.data_dir, "r1");
        write_entry(&path, &Entry::of(&h)).unwrap();
        assert_eq!(
            journals_beside(&h.member.data_dir),
            std::slice::from_ref(&path)
        );
        assert!(!dir.path().join("etcd.bulwark-r1.journal.tmp").exists());

        // The journal says the tool began; the manifest and the data dir
        // were moved, the restored data renamed into place.
        h.partial = true;
        h.last_step = pb::NodeStep::RestoreSnapshot;
        write_entry(&path, &Entry::of(&h)).unwrap();
        std::fs::write(&h.manifest_aside, "kind: Pod").unwrap();
        std::fs::create_dir_all(&h.data_aside).unwrap();
        std::fs::create_dir_all(&h.member.data_dir).unwrap();
        let entry: Entry = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let back = entry.clone().into_held(&manifest);
        assert!(back.manifest_moved && back.data_moved && back.restored);
        assert!(!back.partial && !back.started);
        assert_eq!(back.spec, h.spec);
        assert_eq!(back.last_step, pb::NodeStep::RestoreSnapshot);

        // The manifest back in place: the member was started.
        std::fs::rename(&h.manifest_aside, &manifest).unwrap();
        let back = entry.clone().into_held(&manifest);
        assert!(back.started && !back.manifest_moved);

        // The tool never began: a data dir there is not a restored one.
        let mut fresh = entry;
        fresh.partial = false;
        assert!(!fresh.into_held(&manifest).restored);

        remove_entry(&path).unwrap();
        assert!(journals_beside(&h.member.data_dir).is_empty());
        remove_entry(&path).unwrap();
    }

    /// A member PREPARE built beside the running one: complete only when
    /// the journal said so after the tool (a killed tool's output is not),
    /// and never mistaken for a restored member while the old data dir is
    /// still in place. Once RESTORE marked its swap and renamed it into
    /// the data dir's place, it is the restored member.
    #[test]
    fn a_prebuilt_member_is_not_restored_until_it_takes_the_data_dirs_place() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("manifests/etcd.yaml");
        std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
        std::fs::write(&manifest, "kind: Pod").unwrap();
        std::fs::create_dir_all(dir.path().join("state/r1")).unwrap();
        let mut h = held(dir.path());
        std::fs::create_dir_all(&h.member.data_dir).unwrap();
        let prebuilt = aside_path(&h.member.data_dir, "r1", super::super::PREBUILT);
        std::fs::create_dir_all(&prebuilt).unwrap();

        // The tool was killed: its output is there, the journal never said
        // it was complete.
        let back = Entry::of(&h).into_held(&manifest);
        assert!(!back.prebuilt && !back.restored && !back.manifest_moved);

        // Complete, etcd still running on its data dir.
        h.prebuilt = true;
        let back = Entry::of(&h).into_held(&manifest);
        assert!(back.prebuilt && !back.restored, "{back:?}");

        // RESTORE: manifest and data dir moved, the swap marked; killed
        // before the rename: not restored, the prebuilt member still there.
        std::fs::rename(&manifest, &h.manifest_aside).unwrap();
        std::fs::rename(&h.member.data_dir, &h.data_aside).unwrap();
        h.partial = true;
        let entry = Entry::of(&h);
        let back = entry.clone().into_held(&manifest);
        assert!(back.prebuilt && !back.restored && back.data_moved);

        // Killed right after the rename: the restored member.
        std::fs::rename(&prebuilt, &h.member.data_dir).unwrap();
        let back = entry.into_held(&manifest);
        assert!(back.restored && !back.prebuilt && !back.partial);
    }

    /// A staged file whose restore has no journal is a killed fetch's and
    /// goes; the held restore's, and any beside a manifest set aside, stay.
    #[test]
    fn a_dead_fetchs_staged_file_is_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let stage = |id: &str| {
            let d = state.join(id);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(super::super::STAGED_FILE), b"half a snapshot").unwrap();
            d
        };
        let dead = stage("dead");
        let held = stage("held");
        let aside = stage("aside");
        std::fs::write(aside.join("etcd.yaml"), "kind: Pod").unwrap();
        let finished = stage("finished");
        std::fs::write(finished.join("journal.json"), "{}").unwrap();

        let removed = remove_stale_staged(&state, Some("held"));

        let mut want = vec![
            dead.join(super::super::STAGED_FILE),
            finished.join(super::super::STAGED_FILE),
        ];
        let mut removed = removed;
        removed.sort();
        want.sort();
        assert_eq!(removed, want);
        assert!(!dead.exists(), "an emptied restore dir goes");
        assert!(
            finished.join("journal.json").exists(),
            "a finished journal stays"
        );
        assert!(held.join(super::super::STAGED_FILE).exists());
        assert!(aside.join(super::super::STAGED_FILE).exists());
        assert!(aside.join("etcd.yaml").exists());
        // No state dir yet: nothing to do, no error.
        assert!(remove_stale_staged(&dir.path().join("none"), None).is_empty());
    }
}
