//! The restore agent: this node's part of a whole-cluster restore
//! (`bulwark.backup.v1.RestoreAgent`), driven by the coordinating instance.
//!
//! etcd runs as a kubelet static pod, so the agent never signals a process:
//! it stops etcd by moving the manifest out of the kubelet's manifest dir
//! (into `restore.stateDir/<restore id>/`) and waits until etcd's ports are
//! closed, and starts it by moving the manifest back. The old data dir is
//! renamed to `<dataDir>.bulwark-<restore id>` next to it and never
//! deleted. The member is restored with `etcdutl snapshot restore` (or,
//! where `restore.etcdctl` is set for etcd 3.4, `etcdctl snapshot restore`)
//! during PREPARE, right after the fetch and while the old etcd still
//! runs, into `<dataDir>.bulwark-<restore id>-prebuilt`: the tool's time
//! (seconds for a large database) is no longer time etcd is down, every
//! node's tool runs at once even though the old leader stops last, and a
//! tool that fails (a full disk, a snapshot it rejects) fails the restore
//! before any member was touched. RESTORE then stops etcd, sets its data
//! dir aside and renames the prebuilt member to a fresh `<dataDir>`, so
//! the manifest (its `--data-dir` and its hostPath volume) stays as it
//! was. [`Agent::abort`] undoes each step that was done, in reverse,
//! keeping the restored data as `<dataDir>.bulwark-<restore id>-restored`
//! and removing a `-prebuilt` output that never took the data dir's place
//! (or the `-partial` one an older agent, which ran the tool after etcd
//! stopped, left behind when it was killed).
//!
//! Before anything is fetched, the coordinator's pre-flight asks every
//! agent's [`Agent::check`] for every problem at once (free space, restore
//! tool, manifest, data dir, another restore); [`Agent::prepare`] checks
//! the free space again with the target's exact size and refuses a node
//! whose data dir's file system lacks room for the restored member
//! (`SpaceNeeded`), unless the request skips that check.
//!
//! The member's name, URLs and data dir come from `restore:` in the config,
//! or else from etcd's command line in the manifest.
//!
//! | module | owns |
//! |---|---|
//! | `journal` | the synced journal of this node's steps, and recovering from it after a restart |
//! | `preflight` | the pre-flight: every problem at once, nothing changed |
//! | `steps` | prepare, restore member, start member, abort |
//! | `static_pod` | the member from the static pod's manifest, the restore tool, etcd's ports |
//! | `disk` | fetching the target, aside names and moves, the free-space check |
//! | `target` | a point-in-time target served from the coordinator's node (`FetchTarget`) and fetched from there |

mod disk;
use disk::{aside_path, dir_size, free_bytes};
mod journal;
mod preflight;
mod static_pod;
mod steps;
mod target;
pub use target::Offer;

pub use static_pod::{EtcdCommand, Member};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bulwark_api::backup::v1 as pb;
use chrono::Utc;

use crate::config::RestoreConfig;
use crate::delta::RecorderPause;
use crate::engine::Engine;
use crate::error::{BackupError, Result};
use crate::snapshot::manifest::timestamp;

/// Where a node's restore stands (in memory, and in the journal).
#[derive(Clone, Debug)]
struct Held {
    restore_id: String,
    spec: pb::MemberRestoreSpec,
    member: Member,
    staged: PathBuf,
    manifest_aside: PathBuf,
    data_aside: PathBuf,
    manifest_moved: bool,
    data_moved: bool,
    /// Written to the journal while the prebuilt member is renamed into
    /// place: a data dir found after a crash from then on is the restored
    /// one. Read back from the disk, it says an older agent's tool output
    /// `<dataDir>.bulwark-<id>-partial` is there; the rollback removes it.
    partial: bool,
    /// PREPARE ran the restore tool into `<dataDir>.bulwark-<id>-prebuilt`
    /// and it succeeded: RESTORE only moves that output into place once
    /// etcd is down and its data dir set aside.
    prebuilt: bool,
    restored: bool,
    started: bool,
    last_step: pb::NodeStep,
    last_status: pb::StepStatus,
    error: String,
    expires: Instant,
}

impl Held {
    /// Restore `restore_id` of `member` with its target staged in `dir`
    /// (`restore.stateDir/<restore id>/`), held until `expires`: the
    /// fetch done, nothing on the node touched yet.
    fn staged(
        restore_id: String,
        spec: pb::MemberRestoreSpec,
        member: Member,
        dir: &Path,
        expires: Instant,
    ) -> Self {
        let data_aside = aside_path(&member.data_dir, &restore_id, "");
        Self {
            restore_id,
            spec,
            member,
            staged: dir.join(STAGED_FILE),
            manifest_aside: dir.join("etcd.yaml"),
            data_aside,
            manifest_moved: false,
            data_moved: false,
            partial: false,
            prebuilt: false,
            restored: false,
            started: false,
            last_step: pb::NodeStep::FetchSnapshot,
            last_status: pb::StepStatus::Done,
            error: String::new(),
            expires,
        }
    }
}

impl Held {
    /// Where PREPARE restores the member, beside the running one.
    fn prebuilt_path(&self) -> PathBuf {
        aside_path(&self.member.data_dir, &self.restore_id, PREBUILT)
    }
}

/// The staged target's file name in `restore.stateDir/<restore id>/`.
const STAGED_FILE: &str = "snapshot.db";

/// The aside suffix of the member PREPARE restores beside the running one:
/// `<dataDir>.bulwark-<restore id>-prebuilt`.
const PREBUILT: &str = "-prebuilt";

/// Sink of one node's step events.
pub type StepSink<'a> = &'a (dyn Fn(pb::NodeRestoreProgress) + Send + Sync);

/// The agent.
#[derive(Debug)]
pub struct Agent {
    engine: Arc<Engine>,
    config: RestoreConfig,
    agent_address: String,
    held: tokio::sync::Mutex<Option<Held>>,
    recorder_pause: RecorderPause,
    /// Point-in-time targets this node's coordinator built and serves.
    shelf: target::Shelf,
    /// The identity to fetch a served target from another node with.
    client_tls: Option<Arc<bulwark_common::tls::TlsMaterial>>,
}

impl Agent {
    /// An agent for this node.
    pub fn new(engine: Arc<Engine>, config: RestoreConfig, agent_address: String) -> Self {
        Self {
            engine,
            config,
            agent_address,
            held: tokio::sync::Mutex::new(None),
            recorder_pause: RecorderPause::default(),
            shelf: target::Shelf::default(),
            client_tls: None,
        }
    }

    /// Holds `pause` (this process's delta recorder) while a restore
    /// holds this node.
    pub fn with_recorder_pause(mut self, pause: RecorderPause) -> Self {
        self.recorder_pause = pause;
        self
    }

    /// GetNodeInfo.
    pub async fn node_info(&self) -> Result<pb::NodeInfo> {
        let held = self.held.lock().await.clone();
        let member = self
            .member(held.as_ref().map(|h| h.manifest_aside.as_path()))
            .await?;
        let statuses = self
            .engine
            .etcd
            .with_endpoints(member.client_urls.clone())
            .statuses()
            .await
            .ok();
        let me = statuses.as_ref().and_then(|s| s.first());
        let data_dir = member.data_dir.clone();
        let (free, size) =
            tokio::task::spawn_blocking(move || (free_bytes(&data_dir), dir_size(&data_dir)))
                .await
                .unwrap_or((0, 0));
        Ok(pb::NodeInfo {
            node_name: self.engine.node_name.clone(),
            agent_address: self.agent_address.clone(),
            member_name: member.name,
            member_id: me.map(|m| m.member_id).unwrap_or(0),
            peer_urls: member.peer_urls,
            client_urls: member.client_urls,
            data_dir: member.data_dir.display().to_string(),
            manifest_path: self.config.etcd_manifest.display().to_string(),
            etcd_version: me.map(|m| m.version.clone()).unwrap_or_default(),
            etcdutl: Some(self.etcdutl_capabilities().await),
            etcd_healthy: me.is_some(),
            data_dir_free_bytes: free,
            data_dir_size_bytes: size,
            restore_in_progress: held.map(|h| h.restore_id).unwrap_or_default(),
        })
    }

    fn event(
        &self,
        restore_id: &str,
        step: pb::NodeStep,
        status: pb::StepStatus,
        detail: impl Into<String>,
        path: impl Into<String>,
    ) -> pb::NodeRestoreProgress {
        pb::NodeRestoreProgress {
            restore_id: restore_id.to_owned(),
            node_name: self.engine.node_name.clone(),
            step: step as i32,
            status: status as i32,
            detail: detail.into(),
            path: path.into(),
            transfer: None,
            at: Some(timestamp(Utc::now())),
        }
    }

    /// GetRestoreState.
    pub async fn state(&self, restore_id: &str) -> Result<pb::NodeRestoreState> {
        let held = self.held.lock().await;
        match held.as_ref() {
            Some(h) if restore_id.is_empty() || h.restore_id == restore_id => {
                return Ok(self.state_of(h));
            }
            _ => {}
        }
        drop(held);
        match self.finished(restore_id).await {
            Some(h) => Ok(self.state_of(&h)),
            None => Err(BackupError::NotFound {
                what: format!("restore {restore_id:?} on node {}", self.engine.node_name),
            }),
        }
    }

    fn state_of(&self, h: &Held) -> pb::NodeRestoreState {
        let manifest = self.config.etcd_manifest.display().to_string();
        let mut manual = Vec::new();
        let prebuilt = h.prebuilt_path();
        if prebuilt.exists() {
            manual.push(format!("rm -rf {}", prebuilt.display()));
        }
        if h.partial {
            manual.push(format!(
                "rm -rf {}",
                aside_path(&h.member.data_dir, &h.restore_id, "-partial").display()
            ));
        }
        if h.restored {
            manual.push(format!(
                "mv {} {}",
                h.member.data_dir.display(),
                aside_path(&h.member.data_dir, &h.restore_id, "-restored").display()
            ));
        }
        if h.data_moved {
            manual.push(format!(
                "mv {} {}",
                h.data_aside.display(),
                h.member.data_dir.display()
            ));
        }
        if h.manifest_moved {
            manual.push(format!("mv {} {manifest}", h.manifest_aside.display()));
        }
        pb::NodeRestoreState {
            node_name: self.engine.node_name.clone(),
            last_step: h.last_step as i32,
            last_status: h.last_status as i32,
            manifest_in_place: !h.manifest_moved,
            manifest_aside_path: if h.manifest_moved {
                h.manifest_aside.display().to_string()
            } else {
                String::new()
            },
            data_dir_moved: h.data_moved,
            data_dir_aside_path: if h.data_moved {
                h.data_aside.display().to_string()
            } else {
                String::new()
            },
            restored: h.restored,
            started: h.started,
            manual_rollback: manual,
            error: h.error.clone(),
            restore_id: h.restore_id.clone(),
        }
    }
}
