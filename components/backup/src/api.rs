//! `bulwark.backup.v1.Backup`: the gRPC handlers behind `bulwarkctl backup`.
//!
//! Access levels come from the protos and are enforced by
//! `bulwark_common::grpc::AccessLayer` before a handler runs (delete,
//! create and verify are operator-only). Streaming calls run the operation
//! in a task and forward its progress; the stream ends with `done`/`failed`
//! or the verification result. A client that goes away cancels the work:
//! the task's token is tied to the response channel.
//!
//! `Restore` is handed to [`crate::restore::coordinator::Coordinator`];
//! `GetRestore`/`ListRestores` read the records it keeps in the store
//! ([`crate::restore::record`]), so any instance answers them; the
//! `RestoreAgent` service is [`crate::restore::AgentApi`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;
use bulwark_common::shutdown::Shutdown;
use chrono::Utc;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::error::BackupError;
use crate::schedule::election::LeaderInfo;
use crate::schedule::service::Service;
use crate::snapshot::manifest::timestamp;
use crate::snapshot::{SnapshotEvent, SnapshotOptions};
use crate::verify::{Stage, VerifyEvent};

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The handlers.
#[derive(Clone, Debug)]
pub struct BackupApi {
    service: Arc<Service>,
    shutdown: CancellationToken,
    /// The daemon's tracker: a snapshot or verification a client started
    /// is waited for (it stops on the token) when the daemon shuts down.
    tasks: TaskTracker,
    restore: Option<crate::restore::coordinator::Coordinator>,
}

impl BackupApi {
    /// Handlers over `service`; `shutdown`'s token stops streaming work,
    /// its tracker tracks it.
    pub fn new(service: Arc<Service>, shutdown: &Shutdown) -> Self {
        Self {
            service,
            shutdown: shutdown.token(),
            tasks: shutdown.tracker().clone(),
            restore: None,
        }
    }

    /// On an instance that does not lead: takes the delta recorder's
    /// state and lag from the leader, which alone runs the recorder (its
    /// own would always read "stopped"). The leader is asked with
    /// `local_only`, so a leadership change in between cannot loop; when
    /// it cannot be reached, the local view stays and the log says why.
    async fn fill_from_leader(&self, leader: &LeaderInfo, response: &mut pb::GetStatusResponse) {
        let (Some(address), Some(restore)) = (&leader.address, &self.restore) else {
            return;
        };
        if leader.name == self.service.engine().node_name {
            return;
        }
        let ask = async {
            let mut client = restore.backup_client(address)?;
            client
                .get_status(pb::GetStatusRequest { local_only: true })
                .await
                .map(Response::into_inner)
                .map_err(|e| BackupError::InvalidArgument(e.message().to_owned()))
        };
        let timeout = self.service.engine().etcd.request_timeout();
        match tokio::time::timeout(timeout, ask).await {
            Ok(Ok(theirs)) => {
                response.deltas = theirs.deltas;
                if response.last_drill.is_none() {
                    response.last_drill = theirs.last_drill;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(leader = %leader.name, %address, error = %e, "status: the schedule leader did not answer; showing this instance's view");
            }
            Err(_) => {
                tracing::warn!(leader = %leader.name, %address, "status: the schedule leader did not answer in time; showing this instance's view");
            }
        }
    }

    /// Serves `Restore` through `coordinator`.
    pub fn with_restore(mut self, coordinator: crate::restore::coordinator::Coordinator) -> Self {
        self.restore = Some(coordinator);
        self
    }

    fn coordinator(&self) -> Result<&crate::restore::coordinator::Coordinator, Status> {
        self.restore.as_ref().ok_or_else(|| {
            Status::failed_precondition("this instance has no restore coordinator configured")
        })
    }

    /// Resumes an interrupted restore, or rolls it back, logging who asked.
    fn finish_restore(
        &self,
        caller: Option<String>,
        id: String,
        rollback: bool,
    ) -> Result<Response<Stream_<pb::RestoreProgress>>, Status> {
        let c = self.coordinator()?;
        if rollback {
            tracing::warn!(caller = ?caller, restore_id = %id, "rolling a restore back");
        } else {
            tracing::warn!(caller = ?caller, restore_id = %id, "resuming a restore");
        }
        Ok(Response::new(c.finish_restore(
            id,
            rollback,
            &self.shutdown,
        )?))
    }

    /// The tonic service to register.
    pub fn into_server(self) -> pb::backup_server::BackupServer<Self> {
        pb::backup_server::BackupServer::new(self)
    }

    async fn resolve(&self, sel: Option<&pb::SnapshotSelector>) -> Result<String, Status> {
        match sel.and_then(|s| s.selector.as_ref()) {
            Some(pb::snapshot_selector::Selector::Id(id)) => {
                check_snapshot_id("snapshot.id", id)?;
                Ok(id.clone())
            }
            Some(pb::snapshot_selector::Selector::Latest(true)) => {
                Ok(self.service.engine().latest_snapshot().await?.manifest.id)
            }
            _ => Err(Status::invalid_argument(
                "snapshot: set id, or latest = true",
            )),
        }
    }
}

/// Rejects a snapshot id that cannot name a snapshot before it reaches the
/// store, quoting at most 64 characters of it: the message travels in a
/// response header, and echoing a megabyte-sized id there makes the
/// client's HTTP/2 stack drop the whole connection.
fn check_snapshot_id(field: &str, id: &str) -> Result<(), Status> {
    if crate::store::layout::is_valid_id(id) {
        return Ok(());
    }
    let shown = match id.char_indices().nth(64) {
        None => format!("{id:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &id[..cut], id.len()),
    };
    Err(Status::invalid_argument(format!(
        "{field}: {shown} is not a snapshot id (1-128 letters, digits, '-' or '_', as ListSnapshots shows them)"
    )))
}

/// A task token cancelled when the client hangs up or the server stops.
/// The watcher holds a sender clone until the token is cancelled, so the
/// task cancels the token when it is done, or the stream would never end.
fn task_token<T>(
    tx: &mpsc::Sender<T>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> CancellationToken
where
    T: Send + 'static,
{
    let token = shutdown.child_token();
    let watch = tx.clone();
    let t = token.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = watch.closed() => t.cancel(),
            _ = t.cancelled() => {}
        }
    });
    token
}

fn duration(d: Duration) -> prost_types::Duration {
    bulwark_api::time::duration_to_proto(d).unwrap_or_default()
}

/// A snapshot's progress event as the API sends it.
fn snapshot_event(e: SnapshotEvent) -> pb::snapshot_progress::Event {
    match e {
        SnapshotEvent::Connecting {
            endpoint,
            member_name,
            revision,
            ..
        } => pb::snapshot_progress::Event::Connecting(pb::SnapshotConnecting {
            endpoint,
            member_name,
            revision,
        }),
        SnapshotEvent::Streaming {
            raw_bytes,
            stored_bytes,
            raw_expected,
            elapsed,
        } => pb::snapshot_progress::Event::Streaming(pb::SnapshotStreaming {
            raw_bytes,
            stored_bytes,
            raw_bytes_expected: (raw_expected > 0).then_some(raw_expected),
            raw_bytes_per_second: (raw_bytes as f64 / elapsed.as_secs_f64().max(0.001)) as u64,
            elapsed: Some(duration(elapsed)),
        }),
        SnapshotEvent::Committing { manifest_key } => {
            pb::snapshot_progress::Event::Committing(pb::SnapshotCommitting { manifest_key })
        }
    }
}

#[tonic::async_trait]
impl pb::backup_server::Backup for BackupApi {
    type CreateSnapshotStream = Stream_<pb::SnapshotProgress>;

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<Self::CreateSnapshotStream>, Status> {
        let caller = bulwark_common::grpc::caller(&request).map(ToString::to_string);
        let req = request.into_inner();
        if req.note.chars().count() > 256 {
            return Err(Status::invalid_argument("note: at most 256 characters"));
        }
        let (tx, rx) = mpsc::channel(16);
        let token = task_token(&tx, &self.shutdown, &self.tasks);
        let service = self.service.clone();
        tracing::info!(caller = ?caller, "snapshot requested");
        self.tasks.spawn(async move {
            let started = Instant::now();
            let id = Arc::new(std::sync::Mutex::new(String::new()));
            let send = {
                let tx = tx.clone();
                let id = id.clone();
                move |event: pb::snapshot_progress::Event| {
                    let snapshot_id = id.lock().map(|s| s.clone()).unwrap_or_default();
                    // A full channel only drops a progress tick; the final
                    // message is sent with backpressure below.
                    let _ = tx.try_send(Ok(pb::SnapshotProgress {
                        snapshot_id,
                        at: Some(timestamp(Utc::now())),
                        event: Some(event),
                    }));
                }
            };
            let progress = {
                let send = send.clone();
                let id = id.clone();
                move |e: SnapshotEvent| {
                    if let SnapshotEvent::Connecting { id: sid, .. } = &e
                        && let Ok(mut s) = id.lock()
                    {
                        s.clone_from(sid);
                    }
                    send(snapshot_event(e))
                }
            };
            let mut options = SnapshotOptions::manual(req.note);
            options.member_name = Some(req.member_name).filter(|n| !n.is_empty());
            let result = service
                .snapshot(options, &progress, &token, &|| Ok(()))
                .await;
            let snapshot_id = id.lock().map(|s| s.clone()).unwrap_or_default();
            let last = match result {
                Ok(m) => pb::snapshot_progress::Event::Done(pb::SnapshotDone {
                    manifest: Some(m.to_proto(None)),
                    took: Some(duration(started.elapsed())),
                }),
                Err(BackupError::Busy(who)) => {
                    let _ = tx
                        .send(Err(Status::aborted(format!(
                            "a snapshot is already being taken by {who}"
                        ))))
                        .await;
                    token.cancel();
                    return;
                }
                Err(e) => pb::snapshot_progress::Event::Failed(pb::SnapshotFailed {
                    phase: if snapshot_id.is_empty() {
                        pb::SnapshotPhase::Connecting as i32
                    } else {
                        pb::SnapshotPhase::Streaming as i32
                    },
                    etcd_hash_mismatch: e.reason() == "etcd_hash_mismatch",
                    message: e.to_string(),
                }),
            };
            let _ = tx
                .send(Ok(pb::SnapshotProgress {
                    snapshot_id,
                    at: Some(timestamp(Utc::now())),
                    event: Some(last),
                }))
                .await;
            token.cancel();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let after = req
            .created_after
            .as_ref()
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
        let before = req
            .created_before
            .as_ref()
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
        let page_size = match req.page_size {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let entries = self.service.engine().list_snapshots().await?;
        let filtered: Vec<_> = entries
            .iter()
            .filter(|e| {
                let created = e.manifest.finished_at.timestamp_millis();
                after.is_none_or(|a| created >= a)
                    && before.is_none_or(|b| created < b)
                    && (!req.verified_only
                        || e.last_verification.as_ref().is_some_and(|v| v.passed))
                    && (req.trigger == 0 || e.manifest.to_proto(None).trigger == req.trigger)
                    && (req.page_token.is_empty() || e.manifest.id < req.page_token)
            })
            .collect();
        let page: Vec<_> = filtered.iter().take(page_size).collect();
        let next_page_token = if filtered.len() > page_size {
            page.last()
                .map(|e| e.manifest.id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let timelines = self
            .service
            .engine()
            .timelines_for(entries.iter().map(|e| &e.manifest))
            .await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: page
                .iter()
                .map(|e| pb::SnapshotSummary {
                    timeline: timelines.of_manifest(&e.manifest),
                    ..e.manifest.to_summary(e.last_verification.as_ref())
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotManifest>, Status> {
        let id = self.resolve(request.get_ref().snapshot.as_ref()).await?;
        let engine = self.service.engine();
        let e = engine.get_snapshot(&id).await?;
        let timeline = engine.timelines().await?.of_manifest(&e.manifest);
        Ok(Response::new(pb::SnapshotManifest {
            timeline,
            ..e.manifest.to_proto(e.last_verification.as_ref())
        }))
    }

    type VerifySnapshotStream = Stream_<pb::VerifyProgress>;

    async fn verify_snapshot(
        &self,
        request: Request<pb::VerifySnapshotRequest>,
    ) -> Result<Response<Self::VerifySnapshotStream>, Status> {
        let req = request.into_inner();
        let id = self.resolve(req.snapshot.as_ref()).await?;
        // Fail fast on an unknown id, before the stream opens.
        self.service.engine().get_snapshot(&id).await?;
        let (tx, rx) = mpsc::channel(16);
        let token = task_token(&tx, &self.shutdown, &self.tasks);
        let service = self.service.clone();
        self.tasks.spawn(async move {
            let progress = {
                let tx = tx.clone();
                let id = id.clone();
                move |e: VerifyEvent| {
                    let stage = match e.stage {
                        Stage::StreamCheck => pb::VerifyStage::StreamCheck,
                        Stage::DrillRestore => pb::VerifyStage::DrillRestore,
                        Stage::DrillStart => pb::VerifyStage::DrillStart,
                        Stage::DrillCompare => pb::VerifyStage::DrillCompare,
                    };
                    let transfer = (e.stage == Stage::StreamCheck).then(|| pb::TransferProgress {
                        bytes_done: e.bytes_done,
                        bytes_total: Some(e.bytes_total),
                        bytes_per_second: (e.bytes_done as f64 / e.elapsed.as_secs_f64().max(0.001))
                            as u64,
                        elapsed: Some(duration(e.elapsed)),
                    });
                    let _ = tx.try_send(Ok(pb::VerifyProgress {
                        snapshot_id: id.clone(),
                        at: Some(timestamp(Utc::now())),
                        event: Some(pb::verify_progress::Event::Stage(pb::VerifyStageProgress {
                            stage: stage as i32,
                            transfer,
                            detail: e.detail,
                        })),
                    }));
                }
            };
            let last = match service.verify(&id, req.drill, &progress, &token).await {
                Ok(record) => Ok(pb::VerifyProgress {
                    snapshot_id: id.clone(),
                    at: Some(timestamp(Utc::now())),
                    event: Some(pb::verify_progress::Event::Result(record.to_result())),
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(last).await;
            token.cancel();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let caller = bulwark_common::grpc::caller(&request).map(ToString::to_string);
        let req = request.into_inner();
        check_snapshot_id("id", &req.id)?;
        let deleted = self
            .service
            .engine()
            .delete_snapshot(&req.id, req.force)
            .await?;
        tracing::info!(caller = ?caller, snapshot_id = %deleted.id, freed = deleted.freed_bytes, "snapshot deleted");
        Ok(Response::new(pb::DeleteSnapshotResponse {
            id: deleted.id,
            freed_bytes: deleted.freed_bytes,
            deleted_delta_segments: deleted.deleted_segments,
        }))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let local_only = request.into_inner().local_only;
        let s = &self.service;
        let engine = s.engine();
        let settings = s.settings();
        let leader_info =
            match crate::schedule::election::current_leader(&engine.etcd, &settings.election_name)
                .await
            {
                Ok(l) => l.unwrap_or_default(),
                Err(e) => {
                    tracing::debug!(error = %e, "status: leader unknown");
                    Default::default()
                }
            };
        let leader = leader_info.name.clone();
        let snapshots = engine.list_snapshots().await?;
        let latest = snapshots.first().cloned();
        // One read of the restore and cluster records for the restore point
        // and the timelines (0: unknown).
        let (last_restore, timelines) = match engine
            .restore_point_and_timelines(snapshots.iter().map(|e| &e.manifest))
            .await
        {
            Ok((point, timelines)) => (point, Some(timelines)),
            Err(e) => {
                tracing::warn!(error = %e, "status: could not read the restore or cluster records");
                (None, None)
            }
        };
        let timeline = timelines.as_ref().map_or(0, |t| t.current());
        // A restore after the newest snapshot abandoned its timeline.
        let abandoned = last_restore
            .as_ref()
            .and_then(|r| r.finished_at)
            .is_some_and(|f| latest.as_ref().is_none_or(|l| l.manifest.started_at < f));
        // Segments of the newest snapshot: the history that can be restored.
        let segments = match &latest {
            Some(l) if !abandoned => engine.list_segments(Some(&l.manifest.id)).await?,
            _ => Vec::new(),
        };
        let covered = crate::restore::record::covered_revision(
            latest.as_ref().map(|l| &l.manifest),
            &segments,
            last_restore.as_ref(),
        );
        let ds = s.delta_status();
        let now = Utc::now();
        let lag = ds.rpo_lag(now);
        let delta_state = match (&settings.deltas, &ds.state) {
            (None, _) => pb::DeltaState::Disabled,
            (Some(_), crate::delta::RecorderState::Stopped) => pb::DeltaState::Stopped,
            (Some(_), crate::delta::RecorderState::Gap) => pb::DeltaState::Gap,
            (Some(d), crate::delta::RecorderState::Running) if lag > d.rpo_target => {
                pb::DeltaState::Lagging
            }
            (Some(_), crate::delta::RecorderState::Running) => pb::DeltaState::Running,
        };
        let newest = segments.last();
        let mut response = pb::GetStatusResponse {
            node_name: engine.node_name.clone(),
            store_url: engine.store.display().to_owned(),
            schedule: Some(pb::ScheduleStatus {
                interval: settings
                    .schedule
                    .as_ref()
                    .and_then(|sc| sc.interval_duration())
                    .map(duration),
                next_run_at: s.next_run().map(timestamp),
                leader,
                is_leader: s.is_leader(),
                drill_interval: settings.drill_interval.map(duration),
            }),
            newest_revision_covered: covered.unwrap_or(0),
            timeline,
            last_success: latest.as_ref().map(|l| pb::SnapshotSummary {
                timeline: timelines.as_ref().map_or(0, |t| t.of_manifest(&l.manifest)),
                ..l.manifest.to_summary(l.last_verification.as_ref())
            }),
            last_error: s.last_error().map(|e| pb::ErrorRecord {
                at: Some(timestamp(e.at)),
                operation: e.operation,
                message: e.message,
            }),
            deltas: Some(pb::DeltaStatus {
                state: delta_state as i32,
                newest_revision: newest
                    .map(|n| n.last_revision)
                    .unwrap_or(ds.newest_revision),
                newest_revision_at: newest
                    .map(|n| n.last_event_at)
                    .or(ds.newest_at)
                    .map(timestamp),
                rpo_lag: (ds.state == crate::delta::RecorderState::Running).then(|| duration(lag)),
                segment_count: segments.len() as u64,
            }),
            last_drill: s.last_drill().map(|r| r.to_result()),
            last_verify: s.last_verify().map(|r| r.to_result()),
            restore_in_progress: s.restore_running().map(|r| pb::RestoreInProgress {
                restore_id: r.restore_id,
                coordinator: engine.node_name.clone(),
                started_at: Some(timestamp(r.started_at)),
                phase: r.phase,
                phase_started_at: Some(timestamp(r.phase_started_at)),
                timings: r.timings,
            }),
        };
        if !local_only && settings.deltas.is_some() && !s.is_leader() {
            self.fill_from_leader(&leader_info, &mut response).await;
        }
        Ok(Response::new(response))
    }

    async fn list_deltas(
        &self,
        request: Request<pb::ListDeltasRequest>,
    ) -> Result<Response<pb::ListDeltasResponse>, Status> {
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => 1000,
            n => n.min(10_000) as usize,
        };
        let all = self.service.engine().list_segments(None).await?;
        let mut matching = all.iter().filter(|s| {
            req.from_revision.is_none_or(|r| s.last_revision >= r)
                && req.to_revision.is_none_or(|r| s.first_revision <= r)
                && (req.page_token.is_empty() || s.id > req.page_token)
        });
        let page: Vec<_> = matching.by_ref().take(page_size).collect();
        let next_page_token = if matching.next().is_some() {
            page.last().map(|s| s.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListDeltasResponse {
            segments: page.iter().map(|s| s.to_proto()).collect(),
            next_page_token,
        }))
    }

    async fn collect_garbage(
        &self,
        request: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let caller = bulwark_common::grpc::caller(&request).map(ToString::to_string);
        let dry_run = request.into_inner().dry_run;
        let engine = self.service.engine();
        let c = engine.collect_garbage(Utc::now(), dry_run).await?;
        if !dry_run {
            crate::metrics::garbage_collected(&c);
            tracing::info!(
                caller = ?caller,
                collected = c.collected.len(),
                bytes = c.collected_bytes(),
                failed = c.failed.len(),
                "garbage collection run"
            );
        }
        let objects = |list: &[crate::snapshot::gc::Garbage]| {
            list.iter()
                .map(|g| pb::GarbageObject {
                    path: g.path.clone(),
                    size_bytes: g.size,
                    last_modified: Some(timestamp(g.last_modified)),
                    reason: g.reason.as_str().to_owned(),
                })
                .collect()
        };
        Ok(Response::new(pb::CollectGarbageResponse {
            collected: objects(&c.collected),
            young: objects(&c.young),
            failed: objects(&c.failed),
            grace_period: Some(duration(engine.gc_grace_period)),
            dry_run,
        }))
    }

    async fn get_restore(
        &self,
        request: Request<pb::GetRestoreRequest>,
    ) -> Result<Response<pb::RestoreRecord>, Status> {
        let id = request.into_inner().restore_id;
        let record = self.service.engine().restore_record(&id).await?;
        Ok(Response::new(record.to_proto()))
    }

    async fn list_restores(
        &self,
        _request: Request<pb::ListRestoresRequest>,
    ) -> Result<Response<pb::ListRestoresResponse>, Status> {
        let records = self.service.engine().restore_records().await?;
        Ok(Response::new(pb::ListRestoresResponse {
            restores: records.iter().map(|r| r.to_proto()).collect(),
        }))
    }

    type ResumeRestoreStream = Stream_<pb::RestoreProgress>;

    async fn resume_restore(
        &self,
        request: Request<pb::ResumeRestoreRequest>,
    ) -> Result<Response<Self::ResumeRestoreStream>, Status> {
        let caller = bulwark_common::grpc::caller(&request).map(ToString::to_string);
        self.finish_restore(caller, request.into_inner().restore_id, false)
    }

    type RollbackRestoreStream = Stream_<pb::RestoreProgress>;

    async fn rollback_restore(
        &self,
        request: Request<pb::RollbackRestoreRequest>,
    ) -> Result<Response<Self::RollbackRestoreStream>, Status> {
        let caller = bulwark_common::grpc::caller(&request).map(ToString::to_string);
        self.finish_restore(caller, request.into_inner().restore_id, true)
    }

    type RestoreStream = Stream_<pb::RestoreProgress>;

    async fn restore(
        &self,
        request: Request<pb::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let caller = bulwark_common::grpc::caller(&request).map(ToString::to_string);
        let c = self.coordinator()?;
        tracing::warn!(caller = ?caller, request = ?request.get_ref(), "restore requested");
        Ok(Response::new(
            c.start(request.into_inner(), &self.shutdown)?,
        ))
    }
}
