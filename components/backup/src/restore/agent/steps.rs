//! The agent's steps, one per `RestoreAgent` call: prepare (checks, fetch,
//! the member prebuilt beside the running one, lock), restore the member
//! (manifest out, data dir aside, the prebuilt member into place), start
//! it (manifest back, wait healthy) and abort (undo, newest first).

use std::path::Path;
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::disk::{aside_path, check_space, free_bytes, remove_tool_output, rename};
use super::static_pod::{Member, wait_ports_closed};
use super::{Agent, Held, StepSink};
use crate::error::{BackupError, Result};

/// How often a started member is asked whether it has a leader: a status
/// call to this node's own etcd, cheap, and the restore is done (and its
/// cluster's time measured) the moment it answers yes.
const HEALTH_POLL: Duration = Duration::from_millis(50);

impl Agent {
    /// PrepareRestore: checks, stages the target snapshot, takes the lock.
    pub async fn prepare(
        &self,
        req: pb::PrepareRestoreRequest,
    ) -> Result<pb::PrepareRestoreResponse> {
        self.prepare_with(req, &|_| {}).await
    }

    /// PrepareRestore with the fetch's events (started, bytes about once a
    /// second, done) sent to `sink` (`PrepareRestoreStream`).
    pub async fn prepare_with(
        &self,
        req: pb::PrepareRestoreRequest,
        sink: StepSink<'_>,
    ) -> Result<pb::PrepareRestoreResponse> {
        let spec = req
            .spec
            .ok_or_else(|| BackupError::InvalidArgument("spec: required".into()))?;
        let source = spec
            .snapshot
            .clone()
            .ok_or_else(|| BackupError::InvalidArgument("spec.snapshot: required".into()))?;
        if !crate::store::layout::is_valid_id(&req.restore_id) {
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
            // An expired lock of a restore that never touched etcd.
            remove_prebuilt(h).await;
            self.drop_journal(h).await;
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
        if req.skip_space_check {
            tracing::warn!(restore_id = %req.restore_id, "free-space check skipped (--skip-space-check)");
        } else {
            self.check_space(&member, raw_size(&source)).await?;
        }
        let dir = self.config.state_dir.join(&req.restore_id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| BackupError::local(format!("creating {}", dir.display()), e))?;
        self.check_tool(&spec).await?;
        let staged = dir.join(super::STAGED_FILE);
        self.stage(&req.restore_id, &source, &staged, sink).await?;
        let ttl = req
            .lock_ttl
            .and_then(|d| bulwark_api::time::duration_from_proto(&d).ok())
            .unwrap_or(Duration::from_secs(600));
        let h = Held::staged(
            req.restore_id.clone(),
            spec,
            member,
            &dir,
            Instant::now() + ttl,
        );
        let data_aside = h.data_aside.clone();
        if let Err(e) = self.journal(&h).await {
            let _ = tokio::fs::remove_file(&staged).await;
            return Err(e);
        }
        // Held from here: should this call be dropped while the tool runs
        // (a client gone), the node stays locked until the rollback or the
        // lock's expiry, which remove what the tool left.
        let h = held.insert(h);
        if let Err(e) = self.prebuild(h, sink).await {
            // Nothing was touched, and the prebuild left nothing of its
            // own: the node is released as it was.
            let _ = tokio::fs::remove_file(&staged).await;
            self.drop_journal(h).await;
            *held = None;
            return Err(e);
        }
        drop(held);
        self.recorder_pause
            .hold(&req.restore_id, Instant::now() + ttl);
        tracing::info!(restore_id = %req.restore_id, coordinator = %req.coordinator, "restore prepared");
        Ok(pb::PrepareRestoreResponse {
            info: Some(self.node_info().await?),
            data_dir_aside_path: data_aside.display().to_string(),
            staged_snapshot_path: staged.display().to_string(),
        })
    }

    /// The restored member fits on its data dir's file system (blocking
    /// statvfs calls, off the runtime).
    async fn check_space(&self, member: &Member, raw_snapshot: u64) -> Result<()> {
        let node = self.engine.node_name.clone();
        let data_dir = member.data_dir.clone();
        let state_dir = self.config.state_dir.clone();
        tokio::task::spawn_blocking(move || check_space(&node, &data_dir, &state_dir, raw_snapshot))
            .await
            .map_err(|e| BackupError::local("checking free space", e))?
    }

    /// The restore tool runs here and has the flags `spec` asks for.
    async fn check_tool(&self, spec: &pb::MemberRestoreSpec) -> Result<()> {
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
        Ok(())
    }

    pub(super) async fn held_for(
        &self,
        restore_id: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Held>>> {
        let mut held = self.held.lock().await;
        if held.is_none()
            && let Some(h) = self.finished(restore_id).await
        {
            // Finished here before: started again, or undone, on request.
            *held = Some(h);
        }
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

    /// RestoreMember: stop etcd, move the data dir aside, the restored
    /// member into its place.
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
        let ev = StepEvents {
            agent: self,
            restore_id: &req.restore_id,
            sink,
        };
        if req.dry_run {
            for step in [
                pb::NodeStep::StopEtcd,
                pb::NodeStep::WaitStopped,
                pb::NodeStep::MoveDataDirAside,
                pb::NodeStep::RestoreSnapshot,
            ] {
                ev.skipped(step, "dry run");
            }
            return Ok(());
        }
        let result = self.do_restore(h, ev).await;
        if let Err(e) = &result {
            h.last_status = pb::StepStatus::Failed;
            h.error = e.to_string();
            ev.failed(h.last_step, e);
        }
        result
    }

    /// RestoreMember's steps, each skipped when an earlier attempt of this
    /// restore did it: stop etcd, wait until it stopped, move the data dir
    /// aside, the restored member into its place.
    async fn do_restore(&self, h: &mut Held, ev: StepEvents<'_>) -> Result<()> {
        h.expires = Instant::now() + Duration::from_secs(24 * 3600);
        self.recorder_pause.hold(&h.restore_id, h.expires);
        self.stop_etcd(h, ev).await?;
        self.move_data_aside(h, ev).await?;
        h.last_step = pb::NodeStep::RestoreSnapshot;
        if !h.restored {
            self.restore_snapshot(h, ev).await?;
        }
        ev.done(h.last_step, h.member.data_dir.display().to_string());
        h.last_status = pb::StepStatus::Done;
        Ok(())
    }

    /// Stop: the manifest leaves the kubelet's dir; then wait until etcd's
    /// ports are closed.
    async fn stop_etcd(&self, h: &mut Held, ev: StepEvents<'_>) -> Result<()> {
        let manifest = &self.config.etcd_manifest;
        h.last_step = pb::NodeStep::StopEtcd;
        if !h.manifest_moved {
            ev.started(h.last_step, format!("moving {}", manifest.display()));
            rename(manifest, &h.manifest_aside).await?;
            h.manifest_moved = true;
            self.journal(h).await?;
        }
        ev.done(h.last_step, h.manifest_aside.display().to_string());
        h.last_step = pb::NodeStep::WaitStopped;
        ev.started(h.last_step, "");
        wait_ports_closed(&h.member, self.config.stop_timeout).await?;
        ev.done(h.last_step, "");
        Ok(())
    }

    /// Keep the old data: rename, never delete.
    async fn move_data_aside(&self, h: &mut Held, ev: StepEvents<'_>) -> Result<()> {
        h.last_step = pb::NodeStep::MoveDataDirAside;
        if h.data_moved || h.restored {
            return Ok(());
        }
        if tokio::fs::try_exists(&h.member.data_dir)
            .await
            .unwrap_or(false)
        {
            // Started/Done around the rename: the coordinator times steps
            // (a copy across file systems can take long).
            ev.started(h.last_step, "");
            rename(&h.member.data_dir, &h.data_aside).await?;
            h.data_moved = true;
            self.journal(h).await?;
            ev.done(h.last_step, h.data_aside.display().to_string());
        } else {
            ev.skipped(
                h.last_step,
                format!("{} does not exist", h.member.data_dir.display()),
            );
        }
        Ok(())
    }

    /// PREPARE's last step: the restore tool into
    /// `<dataDir>.bulwark-<id>-prebuilt` beside the running member, which
    /// it does not touch. Journaled once complete. On error nothing of its
    /// own is left (a failed tool's output is removed; a path it did not
    /// make is refused, never touched); a killed tool's output is removed
    /// by the rollback or the lock's expiry.
    async fn prebuild(&self, h: &mut Held, sink: StepSink<'_>) -> Result<()> {
        let restore_id = h.restore_id.clone();
        let ev = StepEvents {
            agent: self,
            restore_id: &restore_id,
            sink,
        };
        let out = h.prebuilt_path();
        h.last_step = pb::NodeStep::PrebuildMember;
        if tokio::fs::symlink_metadata(&out).await.is_ok() {
            let e = BackupError::Refused(format!(
                "{} already exists and is not this restore's output; not touching it",
                out.display()
            ));
            ev.failed(h.last_step, &e);
            return Err(e);
        }
        if let Err(e) = self.restore_tool_into(h, &out, ev).await {
            ev.failed(h.last_step, &e);
            return Err(e);
        }
        h.prebuilt = true;
        if let Err(e) = self.journal(h).await {
            remove_prebuilt(h).await;
            h.prebuilt = false;
            ev.failed(h.last_step, &e);
            return Err(e);
        }
        ev.send(
            h.last_step,
            pb::StepStatus::Done,
            "moved into place once etcd is down",
            out.display().to_string(),
        );
        Ok(())
    }

    /// The restore tool into `out`, beside the running member; its output
    /// removed when it fails.
    async fn restore_tool_into(&self, h: &mut Held, out: &Path, ev: StepEvents<'_>) -> Result<()> {
        let (tool, mut cmd) = self.tool_command(h, out);
        ev.started(h.last_step, format!("{:?}", cmd.as_std()));
        // Tied to this process: a killed agent leaves no tool writing into
        // the output its restart rolls back.
        cmd.kill_on_drop(true);
        let result = bulwark_common::child::output(cmd)
            .await
            .map_err(|e| BackupError::local(format!("running {}", tool.name), e))?;
        if !result.status.success() {
            return Err(tool_failed(h, tool.name, out, &result).await);
        }
        Ok(())
    }

    /// `snapshot restore` of the staged target into `out`, with the
    /// spec's member, cluster and revision flags.
    fn tool_command(
        &self,
        h: &Held,
        out: &Path,
    ) -> (super::static_pod::RestoreTool<'_>, tokio::process::Command) {
        let spec = &h.spec;
        let tool = self.restore_tool();
        let mut cmd = tool.command();
        cmd.arg("snapshot")
            .arg("restore")
            .arg(&h.staged)
            .arg("--data-dir")
            .arg(out)
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
        (tool, cmd)
    }

    /// The member PREPARE prebuilt, renamed into the data dir's place (set
    /// aside or absent by now). `partial` marks, in the journal, that a
    /// data dir found from here on is the restored one. A restore is only
    /// ever held here by the prepare of this process, which prebuilt the
    /// member or failed (a restarted agent holds only a restored node, and
    /// rolls back any other).
    async fn restore_snapshot(&self, h: &mut Held, ev: StepEvents<'_>) -> Result<()> {
        let prebuilt = h.prebuilt_path();
        if !h.prebuilt {
            return Err(BackupError::local(
                "restoring the member",
                format!("{} was never completed by PREPARE", prebuilt.display()),
            ));
        }
        ev.started(
            h.last_step,
            format!(
                "moving the prebuilt member {} into place",
                prebuilt.display()
            ),
        );
        h.partial = true;
        self.journal(h).await?;
        if let Err(e) = rename(&prebuilt, &h.member.data_dir).await {
            // Nothing took the data dir's place: whatever is there is not
            // the restored member (the journal must not say so).
            h.partial = false;
            self.journal(h).await?;
            return Err(e);
        }
        h.partial = false;
        h.prebuilt = false;
        h.restored = true;
        self.journal(h).await?;
        Ok(())
    }
}

/// Removes the member PREPARE built beside the running one, if any: only
/// the restore tool's output, by its restore-specific name (the
/// pre-flight refuses a restore whose name is taken). Best effort: the
/// rollback tries again.
async fn remove_prebuilt(h: &Held) {
    let prebuilt = h.prebuilt_path();
    if let Err(e) = remove_tool_output(&prebuilt).await {
        tracing::warn!(path = %prebuilt.display(), error = %e, "could not remove the prebuilt member");
    }
}

/// A failed restore tool: its unfinished output removed (it never was a
/// data dir etcd ran from; on a full disk this gives the space back), and
/// an error that says what happened, and why when the disk is full.
async fn tool_failed(
    h: &mut Held,
    tool: &str,
    partial: &Path,
    out: &std::process::Output,
) -> BackupError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let removed = match tokio::fs::remove_dir_all(partial).await {
        Ok(()) => {
            h.partial = false;
            "its partial output was removed".to_owned()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            h.partial = false;
            "it wrote nothing".to_owned()
        }
        Err(e) => format!(
            "its partial output {} is left (the rollback removes it): {e}",
            partial.display()
        ),
    };
    let full = if stderr.contains("no space left on device") {
        let parent = h.member.data_dir.parent().unwrap_or(Path::new("/"));
        let free = free_bytes(parent);
        format!(
            "; the file system of {} is full ({free} bytes free after cleaning up; \
             a member needs about the snapshot's size plus two of etcd's 64 MB WAL segments)",
            parent.display(),
        )
    } else {
        String::new()
    };
    BackupError::local(
        format!("{tool} snapshot restore into {}", partial.display()),
        format!(
            "{}: {}{full}; {removed}",
            out.status,
            crate::verify::scratch::tail(&stderr)
        ),
    )
}

/// The decoded size of `source`: what the restored member's database
/// takes on disk.
fn raw_size(source: &pb::SnapshotSource) -> u64 {
    if source.raw_size_bytes > 0 {
        source.raw_size_bytes
    } else {
        source.size_bytes
    }
}

/// Where RestoreMember's steps report: the call's stream, each event
/// stamped with the restore and this node.
#[derive(Clone, Copy)]
struct StepEvents<'a> {
    agent: &'a Agent,
    restore_id: &'a str,
    sink: StepSink<'a>,
}

impl StepEvents<'_> {
    /// A step's event: status, detail, and the path it left something at.
    fn send(
        &self,
        step: pb::NodeStep,
        status: pb::StepStatus,
        detail: impl Into<String>,
        path: impl Into<String>,
    ) {
        (self.sink)(
            self.agent
                .event(self.restore_id, step, status, detail, path),
        );
    }

    /// `step` began, doing `detail`.
    fn started(&self, step: pb::NodeStep, detail: impl Into<String>) {
        self.send(step, pb::StepStatus::Started, detail, "");
    }

    /// `step` is done; what it made or moved is at `path`.
    fn done(&self, step: pb::NodeStep, path: impl Into<String>) {
        self.send(step, pb::StepStatus::Done, "", path);
    }

    /// `step` failed with `e`.
    fn failed(&self, step: pb::NodeStep, e: &BackupError) {
        self.send(step, pb::StepStatus::Failed, e.to_string(), "");
    }

    /// `step` was not needed, for `why`.
    fn skipped(&self, step: pb::NodeStep, why: impl Into<String>) {
        self.send(step, pb::StepStatus::Skipped, why, "");
    }
}

impl Agent {
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
        let ev = StepEvents {
            agent: self,
            restore_id: &rid,
            sink,
        };
        let timeout = req
            .health_timeout
            .and_then(|d| bulwark_api::time::duration_from_proto(&d).ok())
            .unwrap_or(self.config.health_timeout);
        h.last_step = pb::NodeStep::StartEtcd;
        ev.started(h.last_step, "");
        if h.manifest_moved {
            rename(&h.manifest_aside, &self.config.etcd_manifest).await?;
            h.manifest_moved = false;
        }
        h.started = true;
        self.journal(h).await?;
        ev.done(h.last_step, self.config.etcd_manifest.display().to_string());
        h.last_step = pb::NodeStep::WaitHealthy;
        ev.started(h.last_step, "");
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
                ev.send(
                    h.last_step,
                    pb::StepStatus::Done,
                    format!(
                        "member {:x} of cluster {:x} at revision {}",
                        me.member_id, me.cluster_id, me.revision
                    ),
                    "",
                );
                // Done: the lock goes; the old data dir stays where it was moved.
                let member_id = me.member_id;
                let _ = tokio::fs::remove_file(&h.staged).await;
                self.finish_journal(h).await;
                *guard = None;
                self.recorder_pause.release(&rid);
                return Ok(member_id);
            }
            if Instant::now() > deadline || cancel.is_cancelled() {
                let e = BackupError::local(
                    "waiting for the restored member",
                    format!("not healthy after {}", humantime::format_duration(timeout)),
                );
                h.last_status = pb::StepStatus::Failed;
                h.error = e.to_string();
                ev.failed(h.last_step, &e);
                return Err(e);
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// AbortRestore: undo what was done, newest first; keep every copy.
    pub async fn abort(&self, restore_id: &str, reason: &str, sink: StepSink<'_>) -> Result<()> {
        let mut guard = self.held.lock().await;
        if guard.is_none()
            && let Some(h) = self.finished(restore_id).await
        {
            *guard = Some(h);
        }
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
        if h.partial {
            // Only the restore tool's own output, by its restore-specific
            // name (never a data dir etcd ran from): it was never renamed
            // into place.
            let partial = aside_path(&h.member.data_dir, restore_id, "-partial");
            if remove_tool_output(&partial).await? {
                ev(
                    pb::StepStatus::Running,
                    "the restore tool's output that never took the data dir's place was removed"
                        .into(),
                    partial.display().to_string(),
                );
            }
            h.partial = false;
        }
        let prebuilt = h.prebuilt_path();
        if remove_tool_output(&prebuilt).await? {
            ev(
                pb::StepStatus::Running,
                "the member prebuilt beside the running one was removed".into(),
                prebuilt.display().to_string(),
            );
        }
        h.prebuilt = false;
        // Before the original data dir comes back: a data dir found after
        // a crash from here on is the original, never one to set aside.
        self.journal(h).await?;
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
        self.drop_journal(h).await;
        *guard = None;
        self.recorder_pause.release(restore_id);
        ev(
            pb::StepStatus::Done,
            "node is as it was before the restore".into(),
            String::new(),
        );
        Ok(())
    }
}
