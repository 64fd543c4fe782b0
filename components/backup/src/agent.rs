//! The restore agent: this node's part of a whole-cluster restore
//! (`bulwark.backup.v1.RestoreAgent`), driven by the coordinating instance.
//!
//! etcd runs as a kubelet static pod, so the agent never signals a process:
//! it stops etcd by moving the manifest out of the kubelet's manifest dir
//! (into `restore.stateDir/<restore id>/`) and waits until etcd's ports are
//! closed, and starts it by moving the manifest back. The old data dir is
//! renamed to `<dataDir>.bulwark-<restore id>` next to it and never
//! deleted; the member is restored with `etcdutl snapshot restore` (or,
//! where `restore.etcdctl` is set for etcd 3.4, `etcdctl snapshot restore`)
//! into `<dataDir>.bulwark-<restore id>-partial`, renamed to a fresh
//! `<dataDir>` only once the tool succeeded, so the manifest (its
//! `--data-dir` and its hostPath volume) stays as it was and a tool that
//! fails half-way (a full disk) leaves nothing where etcd would start
//! from. [`Agent::abort`] undoes each step that was done, in reverse,
//! keeping the restored data as `<dataDir>.bulwark-<restore id>-restored`.
//!
//! The member's name, URLs and data dir come from `restore:` in the config,
//! or else from etcd's command line in the manifest.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;
use chrono::Utc;
use object_store::ObjectStoreExt;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use crate::config::RestoreConfig;
use crate::engine::Engine;
use crate::error::{BackupError, Result};
use crate::hashing::Sha256;
use crate::manifest::timestamp;

/// `etcdutl`, or etcd 3.4's `etcdctl`, which restores snapshots the same way.
struct RestoreTool<'a> {
    /// "etcdutl" or "etcdctl", as its `version` output names it.
    name: &'static str,
    path: &'a Path,
}

impl RestoreTool<'_> {
    /// The tool with no stdin; etcdctl with the v3 API pinned (3.4's
    /// default, but an inherited `ETCDCTL_API=2` has no `snapshot`).
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.path);
        if self.name == "etcdctl" {
            cmd.env("ETCDCTL_API", "3");
        }
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// etcd's command line as the static pod manifest gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdCommand {
    /// The command and its arguments.
    pub args: Vec<String>,
}

impl EtcdCommand {
    /// Finds the etcd container's command in a static pod manifest.
    pub fn from_manifest(text: &str) -> std::result::Result<Self, String> {
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
        let containers = doc
            .get("spec")
            .and_then(|s| s.get("containers"))
            .and_then(|c| c.as_sequence())
            .ok_or("no spec.containers")?;
        for c in containers {
            let Some(cmd) = c.get("command").and_then(|c| c.as_sequence()) else {
                continue;
            };
            let args: Vec<String> = cmd
                .iter()
                .chain(
                    c.get("args")
                        .and_then(|a| a.as_sequence())
                        .into_iter()
                        .flatten(),
                )
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            if args
                .first()
                .is_some_and(|a| a.rsplit('/').next() == Some("etcd"))
            {
                return Ok(Self { args });
            }
        }
        Err("no container whose command is etcd".into())
    }

    /// The value of `--flag=value` or `--flag value`.
    pub fn flag(&self, name: &str) -> Option<String> {
        let eq = format!("--{name}=");
        let bare = format!("--{name}");
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if let Some(v) = a.strip_prefix(&eq) {
                return Some(v.to_owned());
            }
            if *a == bare {
                return it.next().cloned();
            }
        }
        None
    }
}

/// This node's etcd member, resolved from the config and the manifest.
#[derive(Clone, Debug)]
pub struct Member {
    /// `--name`.
    pub name: String,
    /// `--initial-advertise-peer-urls`.
    pub peer_urls: Vec<String>,
    /// `--advertise-client-urls`.
    pub client_urls: Vec<String>,
    /// `--data-dir`.
    pub data_dir: PathBuf,
}

/// Where a node's restore stands (kept in memory by the agent).
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
    restored: bool,
    started: bool,
    last_step: pb::NodeStep,
    last_status: pb::StepStatus,
    error: String,
    expires: Instant,
}

/// Sink of one node's step events.
pub type StepSink<'a> = &'a (dyn Fn(pb::NodeRestoreProgress) + Send + Sync);

/// The agent.
#[derive(Debug)]
pub struct Agent {
    engine: Arc<Engine>,
    config: RestoreConfig,
    agent_address: String,
    held: tokio::sync::Mutex<Option<Held>>,
}

fn split_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// host:port of a URL.
fn url_addr(u: &str) -> Option<String> {
    let parsed = url::Url::parse(u).ok()?;
    Some(format!(
        "{}:{}",
        parsed.host_str()?,
        parsed.port_or_known_default()?
    ))
}

impl Agent {
    /// An agent for this node.
    pub fn new(engine: Arc<Engine>, config: RestoreConfig, agent_address: String) -> Self {
        Self {
            engine,
            config,
            agent_address,
            held: tokio::sync::Mutex::new(None),
        }
    }

    /// Resolves the member from the config, filling gaps from the manifest
    /// (in place, or moved aside by a restore).
    async fn member(&self, aside: Option<&Path>) -> Result<Member> {
        let path = match aside {
            Some(p) if p.exists() => p.to_owned(),
            _ => self.config.etcd_manifest.clone(),
        };
        let cmd = match tokio::fs::read_to_string(&path).await {
            Ok(text) => EtcdCommand::from_manifest(&text).map_err(|e| {
                BackupError::InvalidArgument(format!("etcd manifest {}: {e}", path.display()))
            })?,
            Err(e) => {
                let c = &self.config;
                if c.member_name.is_none() || c.data_dir.is_none() || c.peer_urls.is_empty() {
                    return Err(BackupError::local(
                        format!(
                            "reading the etcd manifest {} (restore.memberName, dataDir and \
                             peerUrls are not all configured)",
                            path.display()
                        ),
                        e,
                    ));
                }
                EtcdCommand::default()
            }
        };
        let need = |what: &str, v: Option<String>| {
            v.ok_or_else(|| {
                BackupError::InvalidArgument(format!(
                    "etcd's {what} is neither in restore: nor on etcd's command line in {}",
                    path.display()
                ))
            })
        };
        let name = need(
            "--name",
            self.config.member_name.clone().or_else(|| cmd.flag("name")),
        )?;
        let data_dir = need(
            "--data-dir",
            self.config
                .data_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .or_else(|| cmd.flag("data-dir")),
        )?;
        let peer_urls = if self.config.peer_urls.is_empty() {
            split_urls(&need(
                "--initial-advertise-peer-urls",
                cmd.flag("initial-advertise-peer-urls"),
            )?)
        } else {
            self.config.peer_urls.clone()
        };
        let client_urls = if self.config.client_urls.is_empty() {
            split_urls(&need(
                "--advertise-client-urls",
                cmd.flag("advertise-client-urls"),
            )?)
        } else {
            self.config.client_urls.clone()
        };
        Ok(Member {
            name,
            peer_urls,
            client_urls,
            data_dir: PathBuf::from(data_dir),
        })
    }

    /// The tool that restores this member: `restore.etcdctl` (etcd 3.4,
    /// run with `ETCDCTL_API=3`) when set, else `drill.etcdutl`.
    fn restore_tool(&self) -> RestoreTool<'_> {
        match &self.config.etcdctl {
            Some(path) => RestoreTool {
                name: "etcdctl",
                path,
            },
            None => RestoreTool {
                name: "etcdutl",
                path: &self.engine.drill.etcdutl,
            },
        }
    }

    /// What the restore tool's `snapshot restore` here supports.
    async fn etcdutl_capabilities(&self) -> pb::EtcdutlCapabilities {
        let tool = self.restore_tool();
        let prefix = format!("{} version:", tool.name);
        let version = tool
            .command()
            .arg("version")
            .output()
            .await
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
            })
            .unwrap_or_default();
        let help = tool
            .command()
            .args(["snapshot", "restore", "--help"])
            .output()
            .await
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default();
        pb::EtcdutlCapabilities {
            version,
            bump_revision: help.contains("--bump-revision"),
            mark_compacted: help.contains("--mark-compacted"),
        }
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

    /// PrepareRestore: checks, stages the target snapshot, takes the lock.
    pub async fn prepare(
        &self,
        req: pb::PrepareRestoreRequest,
    ) -> Result<pb::PrepareRestoreResponse> {
        let spec = req
            .spec
            .ok_or_else(|| BackupError::InvalidArgument("spec: required".into()))?;
        let source = spec
            .snapshot
            .clone()
            .ok_or_else(|| BackupError::InvalidArgument("spec.snapshot: required".into()))?;
        if !crate::layout::is_valid_id(&req.restore_id) {
            return Err(BackupError::InvalidArgument(format!(
                "restore_id {:?}: expected letters, digits, '-' or '_'",
                req.restore_id
            )));
        }
        let mut held = self.held.lock().await;
        if let Some(h) = held.as_ref() {
            let untouched = !h.manifest_moved && !h.data_moved;
            if h.restore_id == req.restore_id && h.spec == spec {
                return Ok(pb::PrepareRestoreResponse {
                    info: None,
                    data_dir_aside_path: h.data_aside.display().to_string(),
                    staged_snapshot_path: h.staged.display().to_string(),
                });
            }
            if !(untouched && Instant::now() > h.expires) {
                return Err(BackupError::Refused(format!(
                    "node {} is held by restore {}",
                    self.engine.node_name, h.restore_id
                )));
            }
        }
        if !self.config.etcd_manifest.exists() {
            return Err(BackupError::Refused(format!(
                "etcd's manifest {} is not in place: is another restore half-done here?",
                self.config.etcd_manifest.display()
            )));
        }
        let member = self.member(None).await?;
        if member.name != spec.member_name {
            return Err(BackupError::InvalidArgument(format!(
                "this node's etcd member is {:?}, the spec names {:?}",
                member.name, spec.member_name
            )));
        }
        let dir = self.config.state_dir.join(&req.restore_id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| BackupError::local(format!("creating {}", dir.display()), e))?;
        let caps = self.etcdutl_capabilities().await;
        let tool = self.restore_tool();
        if caps.version.is_empty() {
            return Err(BackupError::Refused(format!(
                "{} ({}) does not run here",
                tool.path.display(),
                tool.name
            )));
        }
        if (spec.bump_revision > 0 && !caps.bump_revision)
            || (spec.mark_compacted && !caps.mark_compacted)
        {
            return Err(BackupError::Refused(format!(
                "{} {} here has no --bump-revision/--mark-compacted (etcdutl 3.5.10+ has them)",
                tool.name, caps.version
            )));
        }
        let staged = dir.join("snapshot.db");
        self.fetch(&source, &staged).await?;
        let data_aside = aside_path(&member.data_dir, &req.restore_id, "");
        let ttl = req
            .lock_ttl
            .and_then(|d| bulwark_api::time::duration_from_proto(&d).ok())
            .unwrap_or(Duration::from_secs(600));
        *held = Some(Held {
            restore_id: req.restore_id.clone(),
            spec,
            member,
            staged: staged.clone(),
            manifest_aside: dir.join("etcd.yaml"),
            data_aside: data_aside.clone(),
            manifest_moved: false,
            data_moved: false,
            restored: false,
            started: false,
            last_step: pb::NodeStep::FetchSnapshot,
            last_status: pb::StepStatus::Done,
            error: String::new(),
            expires: Instant::now() + ttl,
        });
        drop(held);
        tracing::info!(restore_id = %req.restore_id, coordinator = %req.coordinator, "restore prepared");
        Ok(pb::PrepareRestoreResponse {
            info: Some(self.node_info().await?),
            data_dir_aside_path: data_aside.display().to_string(),
            staged_snapshot_path: staged.display().to_string(),
        })
    }

    /// Downloads the target snapshot and checks its SHA-256 and size; on
    /// any failure nothing of it is left in the state dir.
    async fn fetch(&self, source: &pb::SnapshotSource, to: &Path) -> Result<()> {
        let fetched = self.fetch_into(source, to).await;
        if fetched.is_err()
            && let Err(e) = tokio::fs::remove_file(to).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %to.display(), error = %e, "could not remove a failed download");
        }
        fetched
    }

    async fn fetch_into(&self, source: &pb::SnapshotSource, to: &Path) -> Result<()> {
        use futures::StreamExt;
        let path = crate::verify::object_path(self.engine.store.prefix(), &source.object_key);
        let described = self.engine.store.describe(&path);
        let get = self
            .engine
            .store
            .inner()
            .get(&path)
            .await
            .map_err(|e| BackupError::store(described.clone(), e))?;
        let mut stream = get.into_stream();
        let mut file = tokio::fs::File::create(to)
            .await
            .map_err(|e| BackupError::local(format!("creating {}", to.display()), e))?;
        let mut h = Sha256::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BackupError::store(described.clone(), e))?;
            h.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| BackupError::local(format!("writing {}", to.display()), e))?;
        }
        file.sync_all()
            .await
            .map_err(|e| BackupError::local(format!("writing {}", to.display()), e))?;
        let (sha, size) = h.finish_hex();
        if sha != source.sha256 || size != source.size_bytes {
            return Err(BackupError::Corrupt {
                kind: crate::error::Corruption::StoredHash,
                what: format!("target snapshot {described}"),
                detail: format!(
                    "expected {} bytes with SHA-256 {}, fetched {size} bytes with {sha}",
                    source.size_bytes, source.sha256
                ),
            });
        }
        Ok(())
    }

    async fn held_for(
        &self,
        restore_id: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Held>>> {
        let held = self.held.lock().await;
        match held.as_ref() {
            Some(h) if h.restore_id == restore_id => Ok(held),
            Some(h) => Err(BackupError::Refused(format!(
                "node {} is held by restore {}, not {restore_id}",
                self.engine.node_name, h.restore_id
            ))),
            None => Err(BackupError::Refused(format!(
                "restore {restore_id} was not prepared on node {}",
                self.engine.node_name
            ))),
        }
    }

    /// RestoreMember: stop etcd, move the data dir aside, restore.
    pub async fn restore_member(
        &self,
        req: pb::RestoreMemberRequest,
        sink: StepSink<'_>,
    ) -> Result<()> {
        let mut guard = self.held_for(&req.restore_id).await?;
        let Some(h) = guard.as_mut() else {
            return Err(BackupError::local("restore agent", "lost its state"));
        };
        if req.spec.as_ref() != Some(&h.spec) {
            return Err(BackupError::Refused(
                "the spec differs from the prepared one".into(),
            ));
        }
        let rid = req.restore_id.clone();
        let ev = |step, status, detail: String, path: String| {
            sink(self.event(&rid, step, status, detail, path))
        };
        if req.dry_run {
            for step in [
                pb::NodeStep::StopEtcd,
                pb::NodeStep::WaitStopped,
                pb::NodeStep::MoveDataDirAside,
                pb::NodeStep::RestoreSnapshot,
            ] {
                ev(
                    step,
                    pb::StepStatus::Skipped,
                    "dry run".into(),
                    String::new(),
                );
            }
            return Ok(());
        }
        let result = self.do_restore(h, &ev).await;
        if let Err(e) = &result {
            h.last_status = pb::StepStatus::Failed;
            h.error = e.to_string();
            ev(
                h.last_step,
                pb::StepStatus::Failed,
                e.to_string(),
                String::new(),
            );
        }
        result
    }

    async fn do_restore(
        &self,
        h: &mut Held,
        ev: &(dyn Fn(pb::NodeStep, pb::StepStatus, String, String) + Send + Sync),
    ) -> Result<()> {
        let manifest = &self.config.etcd_manifest;
        h.expires = Instant::now() + Duration::from_secs(24 * 3600);
        // Stop: the manifest leaves the kubelet's dir.
        h.last_step = pb::NodeStep::StopEtcd;
        if !h.manifest_moved {
            ev(
                h.last_step,
                pb::StepStatus::Started,
                format!("moving {}", manifest.display()),
                String::new(),
            );
            rename(manifest, &h.manifest_aside).await?;
            h.manifest_moved = true;
        }
        ev(
            h.last_step,
            pb::StepStatus::Done,
            String::new(),
            h.manifest_aside.display().to_string(),
        );
        h.last_step = pb::NodeStep::WaitStopped;
        ev(
            h.last_step,
            pb::StepStatus::Started,
            String::new(),
            String::new(),
        );
        wait_ports_closed(&h.member, self.config.stop_timeout).await?;
        ev(
            h.last_step,
            pb::StepStatus::Done,
            String::new(),
            String::new(),
        );
        // Keep the old data: rename, never delete.
        h.last_step = pb::NodeStep::MoveDataDirAside;
        if !h.data_moved && !h.restored {
            if tokio::fs::try_exists(&h.member.data_dir)
                .await
                .unwrap_or(false)
            {
                rename(&h.member.data_dir, &h.data_aside).await?;
                h.data_moved = true;
                ev(
                    h.last_step,
                    pb::StepStatus::Done,
                    String::new(),
                    h.data_aside.display().to_string(),
                );
            } else {
                ev(
                    h.last_step,
                    pb::StepStatus::Skipped,
                    format!("{} does not exist", h.member.data_dir.display()),
                    String::new(),
                );
            }
        }
        h.last_step = pb::NodeStep::RestoreSnapshot;
        if !h.restored {
            // The tool writes into a directory beside the data dir, which
            // takes the data dir's place only once it is complete: a tool
            // that fails half-way (a full disk, a kill) never leaves a
            // half-written member where etcd, or the rollback, expects the
            // data dir.
            let partial = aside_path(&h.member.data_dir, &h.restore_id, "-partial");
            let spec = &h.spec;
            let tool = self.restore_tool();
            let mut cmd = tool.command();
            cmd.arg("snapshot")
                .arg("restore")
                .arg(&h.staged)
                .arg("--data-dir")
                .arg(&partial)
                .args(["--name", &spec.member_name])
                .args(["--initial-cluster", &spec.initial_cluster])
                .args(["--initial-cluster-token", &spec.cluster_token])
                .args(["--initial-advertise-peer-urls", &spec.peer_urls.join(",")]);
            if spec.bump_revision > 0 {
                cmd.arg(format!("--bump-revision={}", spec.bump_revision));
            }
            if spec.mark_compacted {
                cmd.arg("--mark-compacted");
            }
            ev(
                h.last_step,
                pb::StepStatus::Started,
                format!("{:?}", cmd.as_std()),
                String::new(),
            );
            let out = cmd
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| BackupError::local(format!("running {}", tool.name), e))?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                // Only the tool's own unfinished output is removed (it never
                // was a data dir etcd ran from); on a full disk this gives
                // the space back.
                let removed = match tokio::fs::remove_dir_all(&partial).await {
                    Ok(()) => "its partial output was removed".to_owned(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        "it wrote nothing".to_owned()
                    }
                    Err(e) => format!("its partial output {} is left: {e}", partial.display()),
                };
                let full = if stderr.contains("no space left on device") {
                    let parent = h.member.data_dir.parent().unwrap_or(Path::new("/"));
                    let free = free_bytes(parent);
                    format!(
                        "; the file system of {} is full ({free} bytes free after cleaning up; \
                         a member needs about the snapshot's size plus etcd's 64 MB WAL segment)",
                        parent.display(),
                    )
                } else {
                    String::new()
                };
                return Err(BackupError::local(
                    format!("{} snapshot restore into {}", tool.name, partial.display()),
                    format!(
                        "{}: {}{full}; {removed}",
                        out.status,
                        crate::scratch::tail(&stderr)
                    ),
                ));
            }
            rename(&partial, &h.member.data_dir).await?;
            h.restored = true;
        }
        ev(
            h.last_step,
            pb::StepStatus::Done,
            String::new(),
            h.member.data_dir.display().to_string(),
        );
        h.last_status = pb::StepStatus::Done;
        Ok(())
    }

    /// StartMember: manifest back, wait until the member answers.
    pub async fn start_member(
        &self,
        req: pb::StartMemberRequest,
        sink: StepSink<'_>,
        cancel: &CancellationToken,
    ) -> Result<u64> {
        let mut guard = self.held_for(&req.restore_id).await?;
        let Some(h) = guard.as_mut() else {
            return Err(BackupError::local("restore agent", "lost its state"));
        };
        if !h.restored {
            return Err(BackupError::Refused(format!(
                "restore {} has not restored the member on {} yet",
                req.restore_id, self.engine.node_name
            )));
        }
        let rid = req.restore_id.clone();
        let timeout = req
            .health_timeout
            .and_then(|d| bulwark_api::time::duration_from_proto(&d).ok())
            .unwrap_or(self.config.health_timeout);
        h.last_step = pb::NodeStep::StartEtcd;
        if h.manifest_moved {
            rename(&h.manifest_aside, &self.config.etcd_manifest).await?;
            h.manifest_moved = false;
        }
        h.started = true;
        sink(self.event(
            &rid,
            h.last_step,
            pb::StepStatus::Done,
            String::new(),
            self.config.etcd_manifest.display().to_string(),
        ));
        h.last_step = pb::NodeStep::WaitHealthy;
        sink(self.event(
            &rid,
            h.last_step,
            pb::StepStatus::Started,
            String::new(),
            String::new(),
        ));
        let connector = self
            .engine
            .etcd
            .with_endpoints(h.member.client_urls.clone());
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = connector.statuses().await
                && let Some(me) = s.first()
                && me.leader != 0
            {
                h.last_status = pb::StepStatus::Done;
                sink(self.event(
                    &rid,
                    h.last_step,
                    pb::StepStatus::Done,
                    format!(
                        "member {:x} of cluster {:x} at revision {}",
                        me.member_id, me.cluster_id, me.revision
                    ),
                    String::new(),
                ));
                // Done: the lock goes; the old data dir stays where it was moved.
                let member_id = me.member_id;
                let _ = tokio::fs::remove_file(&h.staged).await;
                *guard = None;
                return Ok(member_id);
            }
            if Instant::now() > deadline || cancel.is_cancelled() {
                let e = BackupError::local(
                    "waiting for the restored member",
                    format!("not healthy after {}", humantime::format_duration(timeout)),
                );
                h.last_status = pb::StepStatus::Failed;
                h.error = e.to_string();
                sink(self.event(
                    &rid,
                    h.last_step,
                    pb::StepStatus::Failed,
                    e.to_string(),
                    String::new(),
                ));
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// AbortRestore: undo what was done, newest first; keep every copy.
    pub async fn abort(&self, restore_id: &str, reason: &str, sink: StepSink<'_>) -> Result<()> {
        let mut guard = self.held.lock().await;
        let Some(h) = guard.as_mut().filter(|h| h.restore_id == restore_id) else {
            // Nothing held for it: nothing to undo (idempotent).
            return Ok(());
        };
        tracing::warn!(restore_id, reason, "rolling back the restore on this node");
        let ev = |status, detail: String, path: String| {
            sink(self.event(restore_id, pb::NodeStep::Rollback, status, detail, path))
        };
        ev(pb::StepStatus::Started, reason.to_owned(), String::new());
        let manifest = &self.config.etcd_manifest;
        if h.restored || h.data_moved {
            // Stop the restored member if it runs.
            if !h.manifest_moved && manifest.exists() {
                rename(manifest, &h.manifest_aside).await?;
                h.manifest_moved = true;
            }
            wait_ports_closed(&h.member, self.config.stop_timeout).await?;
        }
        if h.restored {
            let keep = aside_path(&h.member.data_dir, restore_id, "-restored");
            if tokio::fs::try_exists(&h.member.data_dir)
                .await
                .unwrap_or(false)
            {
                rename(&h.member.data_dir, &keep).await?;
                ev(
                    pb::StepStatus::Running,
                    "restored data kept".into(),
                    keep.display().to_string(),
                );
            }
            h.restored = false;
            h.started = false;
        }
        if h.data_moved {
            rename(&h.data_aside, &h.member.data_dir).await?;
            h.data_moved = false;
            ev(
                pb::StepStatus::Running,
                "original data dir back".into(),
                h.member.data_dir.display().to_string(),
            );
        }
        if h.manifest_moved {
            rename(&h.manifest_aside, manifest).await?;
            h.manifest_moved = false;
            ev(
                pb::StepStatus::Running,
                "manifest back".into(),
                manifest.display().to_string(),
            );
        }
        let _ = tokio::fs::remove_file(&h.staged).await;
        *guard = None;
        ev(
            pb::StepStatus::Done,
            "node is as it was before the restore".into(),
            String::new(),
        );
        Ok(())
    }

    /// GetRestoreState.
    pub async fn state(&self, restore_id: &str) -> Result<pb::NodeRestoreState> {
        let held = self.held.lock().await;
        let h = match held.as_ref() {
            Some(h) if restore_id.is_empty() || h.restore_id == restore_id => h,
            _ => {
                return Err(BackupError::NotFound {
                    what: format!("restore {restore_id:?} on node {}", self.engine.node_name),
                });
            }
        };
        Ok(self.state_of(h))
    }

    fn state_of(&self, h: &Held) -> pb::NodeRestoreState {
        let manifest = self.config.etcd_manifest.display().to_string();
        let mut manual = Vec::new();
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

/// `<dir>.bulwark-<restore id><suffix>`, next to `dir`.
fn aside_path(dir: &Path, restore_id: &str, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "etcd".into());
    dir.with_file_name(format!("{name}.bulwark-{restore_id}{suffix}"))
}

async fn rename(from: &Path, to: &Path) -> Result<()> {
    if tokio::fs::try_exists(to).await.unwrap_or(false) {
        return Err(BackupError::Refused(format!(
            "{} already exists; not overwriting it",
            to.display()
        )));
    }
    let what = || format!("moving {} to {}", from.display(), to.display());
    match tokio::fs::rename(from, to).await {
        Ok(()) => Ok(()),
        // In the static pod, etcd's manifest dir and the state dir are
        // separate bind mounts, so the manifest cannot be renamed across.
        Err(e)
            if e.kind() == std::io::ErrorKind::CrossesDevices
                && tokio::fs::metadata(from).await.is_ok_and(|m| m.is_file()) =>
        {
            move_file_across(from, to)
                .await
                .map_err(|e| BackupError::local(what(), e))
        }
        Err(e) => Err(BackupError::local(what(), e)),
    }
}

/// Moves a file to another mount: a copy beside the target, synced, renamed
/// into place, and only then the source removed. Interrupted, it leaves the
/// source in place (and at worst a `.partial` copy), never neither.
async fn move_file_across(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    tokio::fs::copy(from, &partial).await?;
    tokio::fs::File::open(&partial).await?.sync_all().await?;
    tokio::fs::rename(&partial, to).await?;
    if let Some(dir) = to.parent() {
        tokio::fs::File::open(dir).await?.sync_all().await?;
    }
    tokio::fs::remove_file(from).await
}

/// Waits until nothing listens on the member's client and peer ports.
async fn wait_ports_closed(member: &Member, timeout: Duration) -> Result<()> {
    let addrs: Vec<String> = member
        .client_urls
        .iter()
        .chain(&member.peer_urls)
        .filter_map(|u| url_addr(u))
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let mut open = None;
        for a in &addrs {
            let probe = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(a),
            )
            .await;
            if matches!(probe, Ok(Ok(_))) {
                open = Some(a.clone());
                break;
            }
        }
        let Some(open) = open else { return Ok(()) };
        if Instant::now() > deadline {
            return Err(BackupError::local(
                "waiting for etcd to stop",
                format!(
                    "{open} still answers after {} (is the kubelet running and watching the manifest dir?)",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Free bytes on the file system holding `path` (or its parent).
fn free_bytes(path: &Path) -> u64 {
    let probe = if path.exists() {
        path
    } else {
        path.parent().unwrap_or(Path::new("/"))
    };
    let Ok(c) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) == 0 {
            st.f_bavail.saturating_mul(st.f_frsize)
        } else {
            0
        }
    }
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest moves between two mounts (as between the static pod's
    /// bind mounts): /dev/shm is a tmpfs, the temp dir is not.
    #[tokio::test]
    async fn a_manifest_moves_across_mounts_by_copy_then_remove() {
        use std::os::unix::fs::MetadataExt as _;
        let shm = Path::new("/dev/shm");
        let disk = tempfile::tempdir().unwrap();
        assert_ne!(
            std::fs::metadata(shm).unwrap().dev(),
            std::fs::metadata(disk.path()).unwrap().dev(),
            "this test needs /dev/shm on a mount of its own"
        );
        let mounted = tempfile::tempdir_in(shm).unwrap();
        let from = mounted.path().join("etcd.yaml");
        std::fs::write(&from, "kind: Pod\n").unwrap();
        let to = disk.path().join("etcd.yaml.bulwark-r1");
        rename(&from, &to).await.unwrap();
        assert!(!from.exists());
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "kind: Pod\n");
        assert!(!disk.path().join("etcd.yaml.bulwark-r1.partial").exists());
        // And back, as a restore's last step does.
        rename(&to, &from).await.unwrap();
        assert!(from.exists() && !to.exists());
    }

    #[test]
    fn flags_come_from_the_static_pod_command() {
        let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: etcd, namespace: kube-system}
spec:
  containers:
  - name: etcd
    image: registry.k8s.io/etcd:3.5.15-0
    command:
    - etcd
    - --name=cp-1
    - --data-dir=/var/lib/etcd
    - --initial-advertise-peer-urls=https://10.0.0.1:2380
    - --advertise-client-urls
    - https://10.0.0.1:2379,https://127.0.0.1:2379
"#;
        let c = EtcdCommand::from_manifest(manifest).unwrap();
        assert_eq!(c.flag("name").as_deref(), Some("cp-1"));
        assert_eq!(c.flag("data-dir").as_deref(), Some("/var/lib/etcd"));
        assert_eq!(
            split_urls(&c.flag("advertise-client-urls").unwrap()),
            vec!["https://10.0.0.1:2379", "https://127.0.0.1:2379"]
        );
        assert_eq!(c.flag("missing"), None);
        assert!(
            EtcdCommand::from_manifest("spec: {containers: [{command: [kube-apiserver]}]}")
                .is_err()
        );
        assert_eq!(
            aside_path(Path::new("/var/lib/etcd"), "r1", ""),
            PathBuf::from("/var/lib/etcd.bulwark-r1")
        );
        assert_eq!(
            url_addr("https://10.0.0.1:2380").as_deref(),
            Some("10.0.0.1:2380")
        );
    }
}
