//! Whole-cluster restore: the coordinator behind `Backup.Restore`, and the
//! gRPC face of the local [`Agent`] (`RestoreAgent`).
//!
//! ```text
//! PLAN     GetNodeInfo on every agent in restore.peers; choose snapshot + deltas
//! DOWNLOAD/BUILD  the target snapshot, once (pitr): every check fails here, before any node
//! UPLOAD   restore/<restore id>/target.db for the agents to fetch
//! PREPARE  every agent fetches it, checks its SHA-256, takes its lock  (dry run ends here)
//! RESTORE  every agent: manifest out, wait stopped, data dir aside, etcdutl (etcdctl on 3.4) restore
//! START    every agent at once: manifest back, wait healthy
//! ```
//!
//! A failure after PREPARE rolls every node back (AbortRestore): the
//! original data dir and manifest return, the restored data is kept aside.
//! The final message says where each node stands either way.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::restore_agent_client::RestoreAgentClient;
use bulwark_common::tls::TlsMaterial;
use chrono::Utc;
use futures::Stream;
use object_store::ObjectStoreExt;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::error::{BackupError, Result};
use crate::manifest::timestamp;
use crate::pitr::{BuildEvent, Target};
use crate::service::{RestoreRunning, Service};

type Stream_<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// Default revision bump where etcdutl supports it.
pub const DEFAULT_BUMP: u64 = 1_000_000_000;

/// Coordinates restores from this instance.
#[derive(Clone)]
pub struct Coordinator {
    service: Arc<Service>,
    peers: Vec<String>,
    client_tls: Arc<TlsMaterial>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("peers", &self.peers)
            .finish()
    }
}

fn d(x: Duration) -> prost_types::Duration {
    bulwark_api::time::duration_to_proto(x).unwrap_or_default()
}

/// Sends events of one restore.
struct Events {
    tx: mpsc::Sender<std::result::Result<pb::RestoreProgress, Status>>,
    restore_id: String,
}

impl Events {
    async fn send(&self, event: pb::restore_progress::Event) {
        let _ = self
            .tx
            .send(Ok(pb::RestoreProgress {
                restore_id: self.restore_id.clone(),
                at: Some(timestamp(Utc::now())),
                event: Some(event),
            }))
            .await;
    }

    fn try_send(&self, event: pb::restore_progress::Event) {
        let _ = self.tx.try_send(Ok(pb::RestoreProgress {
            restore_id: self.restore_id.clone(),
            at: Some(timestamp(Utc::now())),
            event: Some(event),
        }));
    }

    async fn phase(
        &self,
        phase: pb::RestorePhase,
        transfer: Option<pb::TransferProgress>,
        revision: Option<i64>,
    ) {
        self.send(pb::restore_progress::Event::Phase(
            pb::RestorePhaseProgress {
                phase: phase as i32,
                transfer,
                revision,
            },
        ))
        .await;
    }
}

/// A failure at `phase`.
struct Failed {
    phase: pb::RestorePhase,
    error: String,
}

fn fail(phase: pb::RestorePhase) -> impl Fn(BackupError) -> Failed {
    move |e| Failed {
        phase,
        error: e.to_string(),
    }
}

fn status_fail(phase: pb::RestorePhase, node: &str) -> impl Fn(Status) -> Failed + '_ {
    move |s| Failed {
        phase,
        error: format!("node {node}: {}", s.message()),
    }
}

impl Coordinator {
    /// A coordinator driving the agents at `peers` with `client_tls`.
    pub fn new(service: Arc<Service>, peers: Vec<String>, client_tls: TlsMaterial) -> Self {
        Self {
            service,
            peers,
            client_tls: Arc::new(client_tls),
        }
    }

    fn client(&self, address: &str) -> Result<RestoreAgentClient<Channel>> {
        let ch = bulwark_common::grpc::channel(address, &self.client_tls, None)
            .map_err(|e| BackupError::InvalidArgument(format!("agent address {address}: {e}")))?;
        Ok(RestoreAgentClient::new(ch))
    }

    /// Validates `req` and starts the restore; the stream carries its events.
    pub fn start(
        &self,
        req: pb::RestoreRequest,
        shutdown: &CancellationToken,
    ) -> std::result::Result<Stream_<pb::RestoreProgress>, Status> {
        if !req.dry_run && !req.confirm {
            return Err(Status::failed_precondition(
                "a restore replaces every etcd member's data: confirm it (bulwarkctl restore --yes) or ask for a dry run",
            ));
        }
        if self.peers.is_empty() {
            return Err(Status::failed_precondition(
                "restore.peers is empty in this instance's config: it does not know the control-plane nodes",
            ));
        }
        let snapshot = match req.snapshot.as_ref().and_then(|s| s.selector.as_ref()) {
            None | Some(pb::snapshot_selector::Selector::Latest(true)) => None,
            Some(pb::snapshot_selector::Selector::Id(id)) => Some(id.clone()),
            Some(pb::snapshot_selector::Selector::Latest(false)) => {
                return Err(Status::invalid_argument(
                    "snapshot.latest: must be true when set",
                ));
            }
        };
        let explicit_latest = matches!(
            req.snapshot.as_ref().and_then(|s| s.selector.as_ref()),
            Some(pb::snapshot_selector::Selector::Latest(true))
        );
        let target = match req.target.as_ref().and_then(|t| t.target.as_ref()) {
            None => Target::Snapshot,
            Some(pb::restore_target::Target::Latest(true)) => Target::Latest,
            Some(pb::restore_target::Target::Latest(false)) => {
                return Err(Status::invalid_argument(
                    "target.latest: must be true when set",
                ));
            }
            Some(pb::restore_target::Target::Revision(r)) if *r > 0 => Target::Revision(*r),
            Some(pb::restore_target::Target::Revision(r)) => {
                return Err(Status::invalid_argument(format!(
                    "target.revision: {r} is not a revision (expected > 0)"
                )));
            }
            Some(pb::restore_target::Target::Time(t)) => {
                let st = bulwark_api::time::timestamp_from_proto(t)
                    .map_err(|e| e.into_status("target.time"))?;
                Target::Time(chrono::DateTime::<Utc>::from(st))
            }
        };
        // `--snapshot latest` with a revision or time means "the newest
        // snapshot that reaches it", as unset does.
        let snapshot = if explicit_latest && matches!(target, Target::Snapshot | Target::Latest) {
            None
        } else {
            snapshot
        };
        let (tx, rx) = mpsc::channel(64);
        let cancel = shutdown.child_token();
        let this = self.clone();
        tokio::spawn(async move {
            let guard = match this.service.try_restore_lock() {
                Ok(g) => g,
                Err(e) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            };
            let restore_id = format!(
                "{}-{}",
                crate::layout::format_time(Utc::now()),
                crate::hashing::hex(&rand_suffix())
            );
            let events = Events {
                tx,
                restore_id: restore_id.clone(),
            };
            this.run(req, snapshot, target, &events, &cancel).await;
            this.service.set_restore(None);
            drop(guard);
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    fn set_phase(&self, restore_id: &str, started: chrono::DateTime<Utc>, phase: pb::RestorePhase) {
        self.service.set_restore(Some(RestoreRunning {
            restore_id: restore_id.to_owned(),
            started_at: started,
            phase: phase as i32,
        }));
    }

    async fn run(
        &self,
        req: pb::RestoreRequest,
        snapshot: Option<String>,
        target: Target,
        events: &Events,
        cancel: &CancellationToken,
    ) {
        let started = Instant::now();
        let started_at = Utc::now();
        let rid = events.restore_id.clone();
        let engine = self.service.engine().clone();
        tracing::info!(restore_id = %rid, ?target, dry_run = req.dry_run, "restore starting");
        self.set_phase(&rid, started_at, pb::RestorePhase::Plan);
        let mut prepared: Vec<(pb::NodeInfo, RestoreAgentClient<Channel>)> = Vec::new();
        let mut touched = false;
        let result: std::result::Result<pb::RestoreSummary, Failed> = async {
            // PLAN
            let mut nodes = Vec::new();
            for address in &self.peers {
                let mut c = self.client(address).map_err(fail(pb::RestorePhase::Plan))?;
                let info = c
                    .get_node_info(pb::GetNodeInfoRequest {})
                    .await
                    .map_err(status_fail(pb::RestorePhase::Plan, address))?
                    .into_inner();
                if !info.restore_in_progress.is_empty() {
                    return Err(Failed {
                        phase: pb::RestorePhase::Plan,
                        error: format!(
                            "node {} is held by restore {}",
                            info.node_name, info.restore_in_progress
                        ),
                    });
                }
                nodes.push((info, c));
            }
            let plan = engine
                .plan_restore(snapshot.as_deref(), target)
                .await
                .map_err(fail(pb::RestorePhase::Plan))?;
            let lacking_bump: Vec<&str> = nodes
                .iter()
                .filter(|(n, _)| {
                    !n.etcdutl.as_ref().is_some_and(|e| e.bump_revision && e.mark_compacted)
                })
                .map(|(n, _)| n.node_name.as_str())
                .collect();
            let mut warnings = plan.warnings.clone();
            let bump = match req.bump_revision {
                Some(b) => b,
                None if lacking_bump.is_empty() => DEFAULT_BUMP,
                None => {
                    warnings.push(format!(
                        "the restore tool on {} lacks --bump-revision/--mark-compacted \
                         (etcdutl 3.5.10+ has them; etcd 3.4's etcdctl does not): \
                         restoring without a revision bump; clients that cached revisions should re-list",
                        lacking_bump.join(", ")
                    ));
                    0
                }
            };
            let mark_compacted = req.mark_compacted.unwrap_or(bump > 0);
            if req.skip_space_check {
                warnings.push(
                    "the nodes' free-space check is skipped (--skip-space-check): a node whose \
                     disk fills up during the restore makes every node roll back"
                        .to_owned(),
                );
            }
            let initial_cluster = nodes
                .iter()
                .flat_map(|(n, _)| n.peer_urls.iter().map(move |u| format!("{}={u}", n.member_name)))
                .collect::<Vec<_>>()
                .join(",");
            let token = if req.cluster_token.is_empty() {
                format!("bulwark-restore-{rid}")
            } else {
                req.cluster_token.clone()
            };
            events
                .send(pb::restore_progress::Event::Plan(pb::RestorePlan {
                    snapshot: Some(plan.base.to_proto(None)),
                    deltas: plan.segments.iter().map(|s| s.to_proto()).collect(),
                    target_revision: plan.target_revision.unwrap_or(0),
                    target_time: match target {
                        Target::Time(t) => Some(timestamp(t)),
                        _ => None,
                    },
                    nodes: nodes
                        .iter()
                        .map(|(n, _)| pb::PlannedNode {
                            data_dir_aside_path: format!("{}.bulwark-{rid}", n.data_dir),
                            info: Some(n.clone()),
                        })
                        .collect(),
                    initial_cluster: initial_cluster.clone(),
                    cluster_token: token.clone(),
                    bump_revision: bump,
                    mark_compacted,
                    dry_run: req.dry_run,
                    warnings,
                }))
                .await;

            // DOWNLOAD + BUILD
            self.set_phase(&rid, started_at, pb::RestorePhase::Download);
            let parent = engine.drill.work_dir.clone().unwrap_or_else(std::env::temp_dir);
            let work = tempfile::Builder::new()
                .prefix("bulwark-restore-")
                .tempdir_in(&parent)
                .map_err(|e| BackupError::local(format!("creating a work dir in {}", parent.display()), e))
                .map_err(fail(pb::RestorePhase::Download))?;
            let on_build = |e: BuildEvent| match e {
                BuildEvent::Download { bytes_done, bytes_total, elapsed } => {
                    events.try_send(pb::restore_progress::Event::Phase(pb::RestorePhaseProgress {
                        phase: pb::RestorePhase::Download as i32,
                        transfer: Some(pb::TransferProgress {
                            bytes_done,
                            bytes_total: Some(bytes_total),
                            bytes_per_second: (bytes_done as f64 / elapsed.as_secs_f64().max(0.001)) as u64,
                            elapsed: Some(d(elapsed)),
                        }),
                        revision: None,
                    }))
                }
                BuildEvent::Replay { revision, .. } => {
                    events.try_send(pb::restore_progress::Event::Phase(pb::RestorePhaseProgress {
                        phase: pb::RestorePhase::Build as i32,
                        transfer: None,
                        revision: Some(revision),
                    }))
                }
            };
            let built = engine
                .build_target(&plan, work.path(), &on_build, cancel)
                .await
                .map_err(|e| Failed {
                    phase: if matches!(e, BackupError::Corrupt { .. }) {
                        pb::RestorePhase::Download
                    } else {
                        pb::RestorePhase::Build
                    },
                    error: format!("{e} (no node was touched)"),
                })?;
            events
                .phase(pb::RestorePhase::Build, None, built.revision)
                .await;

            // UPLOAD
            self.set_phase(&rid, started_at, pb::RestorePhase::Upload);
            let key = format!("{}/restore/{rid}/target.db", engine.cluster_name);
            let object = crate::verify::object_path(engine.store.prefix(), &key);
            upload_file(&engine, &built.path, &object)
                .await
                .map_err(fail(pb::RestorePhase::Upload))?;
            events
                .phase(
                    pb::RestorePhase::Upload,
                    Some(pb::TransferProgress {
                        bytes_done: built.size,
                        bytes_total: Some(built.size),
                        bytes_per_second: 0,
                        elapsed: Some(d(started.elapsed())),
                    }),
                    None,
                )
                .await;
            let source = pb::SnapshotSource {
                object_key: key.clone(),
                sha256: built.sha256.clone(),
                size_bytes: built.size,
            };
            drop(work);

            let outcome = async {
                // PREPARE
                self.set_phase(&rid, started_at, pb::RestorePhase::Prepare);
                let spec_of = |n: &pb::NodeInfo| pb::MemberRestoreSpec {
                    snapshot: Some(source.clone()),
                    member_name: n.member_name.clone(),
                    peer_urls: n.peer_urls.clone(),
                    initial_cluster: initial_cluster.clone(),
                    cluster_token: token.clone(),
                    bump_revision: bump,
                    mark_compacted,
                };
                for (info, c) in &nodes {
                    let ev = |status: pb::StepStatus, detail: String| pb::NodeRestoreProgress {
                        restore_id: rid.clone(),
                        node_name: info.node_name.clone(),
                        step: pb::NodeStep::FetchSnapshot as i32,
                        status: status as i32,
                        detail,
                        path: String::new(),
                        transfer: None,
                        at: Some(timestamp(Utc::now())),
                    };
                    events.send(pb::restore_progress::Event::Node(ev(pb::StepStatus::Started, String::new()))).await;
                    let mut c = c.clone();
                    let r = c
                        .prepare_restore(pb::PrepareRestoreRequest {
                            restore_id: rid.clone(),
                            coordinator: engine.node_name.clone(),
                            spec: Some(spec_of(info)),
                            lock_ttl: Some(d(Duration::from_secs(600))),
                            skip_space_check: req.skip_space_check,
                        })
                        .await;
                    // Even a failed prepare may hold the lock: undo it too.
                    prepared.push((info.clone(), c.clone()));
                    let r = r.map_err(status_fail(pb::RestorePhase::Prepare, &info.node_name))?;
                    events
                        .send(pb::restore_progress::Event::Node(ev(
                            pb::StepStatus::Done,
                            format!("staged at {}", r.into_inner().staged_snapshot_path),
                        )))
                        .await;
                }
                if req.dry_run {
                    return Ok(None);
                }
                // RESTORE
                self.set_phase(&rid, started_at, pb::RestorePhase::RestoreMembers);
                events.phase(pb::RestorePhase::RestoreMembers, None, None).await;
                touched = true;
                for (info, c) in &nodes {
                    let mut c = c.clone();
                    let stream = c
                        .restore_member(pb::RestoreMemberRequest {
                            restore_id: rid.clone(),
                            spec: Some(spec_of(info)),
                            dry_run: false,
                        })
                        .await
                        .map_err(status_fail(pb::RestorePhase::RestoreMembers, &info.node_name))?;
                    relay(stream.into_inner(), events)
                        .await
                        .map_err(status_fail(pb::RestorePhase::RestoreMembers, &info.node_name))?;
                }
                // START (all at once: a member is healthy only with a quorum)
                self.set_phase(&rid, started_at, pb::RestorePhase::StartMembers);
                events.phase(pb::RestorePhase::StartMembers, None, None).await;
                let starts = nodes.iter().map(|(info, c)| {
                    let mut c = c.clone();
                    let rid = rid.clone();
                    async move {
                        let stream = c
                            .start_member(pb::StartMemberRequest {
                                restore_id: rid,
                                health_timeout: None,
                            })
                            .await
                            .map_err(status_fail(pb::RestorePhase::StartMembers, &info.node_name))?;
                        relay(stream.into_inner(), events)
                            .await
                            .map_err(status_fail(pb::RestorePhase::StartMembers, &info.node_name))
                    }
                });
                for r in futures::future::join_all(starts).await {
                    r?;
                }
                Ok(Some(()))
            }
            .await;
            // The target object is only for this restore.
            if let Err(e) = engine.store.inner().delete(&object).await {
                tracing::warn!(error = %e, object = %object, "could not delete the restore's target snapshot");
            }
            let done = outcome?;
            let mut summary = pb::RestoreSummary {
                cluster_id: 0,
                revision: built.revision.unwrap_or(plan.base.revision),
                snapshot_id: plan.base.id.clone(),
                deltas_applied: built.segments_applied,
                took: None,
                nodes: Vec::new(),
                dry_run: req.dry_run,
            };
            if done.is_some() {
                let urls: Vec<String> = nodes.iter().flat_map(|(n, _)| n.client_urls.clone()).collect();
                let statuses = engine.etcd.with_endpoints(urls).statuses().await.unwrap_or_default();
                let Some(s) = statuses.first() else {
                    return Err(Failed {
                        phase: pb::RestorePhase::StartMembers,
                        error: "no restored member answers its status call".into(),
                    });
                };
                // The members restored the target: the cluster holds at
                // least its revision (more with a bump, or new writes).
                if let Some(r) = built.revision
                    && s.revision < r
                {
                    return Err(Failed {
                        phase: pb::RestorePhase::StartMembers,
                        error: format!(
                            "the restored cluster is at revision {}, the target was {r}",
                            s.revision
                        ),
                    });
                }
                summary.cluster_id = s.cluster_id;
                summary.revision = s.revision;
                summary.nodes = nodes
                    .iter()
                    .map(|(n, _)| pb::NodeOutcome {
                        node_name: n.node_name.clone(),
                        member_name: n.member_name.clone(),
                        member_id: statuses
                            .iter()
                            .find(|s| n.client_urls.contains(&s.endpoint))
                            .map(|s| s.member_id)
                            .unwrap_or(0),
                        data_dir_aside_path: format!("{}.bulwark-{rid}", n.data_dir),
                    })
                    .collect();
            }
            Ok(summary)
        }
        .await;

        match result {
            Ok(mut summary) => {
                if summary.dry_run {
                    // Release the nodes' locks and staged files.
                    for (info, c) in &prepared {
                        let _ = abort_node(c.clone(), &rid, "dry run finished", events, info).await;
                    }
                }
                summary.took = Some(d(started.elapsed()));
                crate::metrics::restore_finished(if summary.dry_run { "dry_run" } else { "done" });
                tracing::info!(restore_id = %rid, revision = summary.revision, "restore finished");
                events
                    .send(pb::restore_progress::Event::Done(summary))
                    .await;
            }
            Err(f) => {
                tracing::warn!(restore_id = %rid, phase = ?f.phase, error = %f.error, "restore failed; rolling back");
                crate::metrics::restore_finished("failed");
                self.set_phase(&rid, started_at, pb::RestorePhase::Rollback);
                let mut rolled_back = true;
                let mut states = Vec::new();
                for (info, c) in &prepared {
                    if let Err(e) = abort_node(c.clone(), &rid, &f.error, events, info).await {
                        rolled_back = false;
                        tracing::warn!(node = %info.node_name, error = %e, "rollback failed");
                    }
                    let mut c = c.clone();
                    match c
                        .get_restore_state(pb::GetRestoreStateRequest {
                            restore_id: rid.clone(),
                        })
                        .await
                    {
                        Ok(s) => {
                            rolled_back = false;
                            states.push(s.into_inner());
                        }
                        Err(s) if s.code() == tonic::Code::NotFound => {
                            states.push(pb::NodeRestoreState {
                                node_name: info.node_name.clone(),
                                manifest_in_place: true,
                                restore_id: rid.clone(),
                                ..Default::default()
                            });
                        }
                        Err(s) => {
                            rolled_back = false;
                            states.push(pb::NodeRestoreState {
                                node_name: info.node_name.clone(),
                                error: format!("unreachable: {}", s.message()),
                                restore_id: rid.clone(),
                                ..Default::default()
                            });
                        }
                    }
                }
                let instructions = if !touched {
                    "nothing was changed on any node".to_owned()
                } else if rolled_back {
                    "every node is back on its original data dir and manifest; the restored data \
                     was kept as <dataDir>.bulwark-<restore id>-restored"
                        .to_owned()
                } else {
                    "some nodes could not be rolled back: run each node's manual_rollback \
                     commands, then check etcd with `etcdctl endpoint health`"
                        .to_owned()
                };
                events
                    .send(pb::restore_progress::Event::Failed(pb::RestoreFailure {
                        phase: f.phase as i32,
                        message: f.error,
                        nodes: states,
                        rolled_back: rolled_back || !touched,
                        rollback_instructions: instructions,
                    }))
                    .await;
            }
        }
    }
}

fn rand_suffix() -> [u8; 2] {
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b
}

/// Relays a node's step stream until it ends; an rpc error is the failure.
async fn relay(
    mut stream: tonic::Streaming<pb::NodeRestoreProgress>,
    events: &Events,
) -> std::result::Result<(), Status> {
    while let Some(ev) = stream.message().await? {
        events.send(pb::restore_progress::Event::Node(ev)).await;
    }
    Ok(())
}

async fn abort_node(
    mut c: RestoreAgentClient<Channel>,
    rid: &str,
    reason: &str,
    events: &Events,
    info: &pb::NodeInfo,
) -> std::result::Result<(), Status> {
    let stream = c
        .abort_restore(pb::AbortRestoreRequest {
            restore_id: rid.to_owned(),
            reason: reason.to_owned(),
        })
        .await?;
    relay(stream.into_inner(), events).await.map_err(|s| {
        Status::new(
            s.code(),
            format!("node {}: {}", info.node_name, s.message()),
        )
    })
}

/// Uploads a local file (multipart).
async fn upload_file(
    engine: &crate::Engine,
    path: &std::path::Path,
    object: &object_store::path::Path,
) -> Result<()> {
    let described = engine.store.describe(object);
    let upload = engine
        .store
        .inner()
        .put_multipart(object)
        .await
        .map_err(|e| BackupError::store(described.clone(), e))?;
    let mut up = crate::upload::PartUploader::new(
        upload,
        engine.pipeline.part_size,
        engine.pipeline.upload_concurrency,
    );
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| BackupError::local(format!("opening {}", path.display()), e))?;
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| BackupError::local(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        up.put(bytes::Bytes::from(buf));
        if let Err(e) = up.wait_for_capacity().await {
            up.abort().await;
            return Err(BackupError::store(described, e));
        }
    }
    up.finish()
        .await
        .map_err(|e| BackupError::store(described, e))?;
    Ok(())
}

/// `bulwark.backup.v1.RestoreAgent` over the local [`Agent`].
#[derive(Clone, Debug)]
pub struct AgentApi {
    agent: Arc<Agent>,
    shutdown: CancellationToken,
}

impl AgentApi {
    /// Handlers over `agent`.
    pub fn new(agent: Arc<Agent>, shutdown: CancellationToken) -> Self {
        Self { agent, shutdown }
    }

    /// The tonic service to register.
    pub fn into_server(self) -> pb::restore_agent_server::RestoreAgentServer<Self> {
        pb::restore_agent_server::RestoreAgentServer::new(self)
    }

    /// Runs `op` in a task, streaming its step events; an error ends the
    /// stream with its status.
    fn stream<F>(&self, op: F) -> Stream_<pb::NodeRestoreProgress>
    where
        F: for<'a> FnOnce(
                Arc<Agent>,
                &'a (dyn Fn(pb::NodeRestoreProgress) + Send + Sync),
                CancellationToken,
            ) -> futures::future::BoxFuture<'a, Result<()>>
            + Send
            + 'static,
    {
        let (tx, rx) = mpsc::channel(64);
        let agent = self.agent.clone();
        let cancel = self.shutdown.child_token();
        tokio::spawn(async move {
            let sink_tx = tx.clone();
            let sink = move |e: pb::NodeRestoreProgress| {
                let _ = sink_tx.try_send(Ok(e));
            };
            if let Err(e) = op(agent, &sink, cancel).await {
                let _ = tx.send(Err(Status::from(e))).await;
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl pb::restore_agent_server::RestoreAgent for AgentApi {
    async fn get_node_info(
        &self,
        _request: Request<pb::GetNodeInfoRequest>,
    ) -> std::result::Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(self.agent.node_info().await?))
    }

    async fn prepare_restore(
        &self,
        request: Request<pb::PrepareRestoreRequest>,
    ) -> std::result::Result<Response<pb::PrepareRestoreResponse>, Status> {
        Ok(Response::new(
            self.agent.prepare(request.into_inner()).await?,
        ))
    }

    type RestoreMemberStream = Stream_<pb::NodeRestoreProgress>;

    async fn restore_member(
        &self,
        request: Request<pb::RestoreMemberRequest>,
    ) -> std::result::Result<Response<Self::RestoreMemberStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.stream(move |agent, sink, _| {
            Box::pin(async move { agent.restore_member(req, sink).await })
        })))
    }

    type StartMemberStream = Stream_<pb::NodeRestoreProgress>;

    async fn start_member(
        &self,
        request: Request<pb::StartMemberRequest>,
    ) -> std::result::Result<Response<Self::StartMemberStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.stream(move |agent, sink, cancel| {
            Box::pin(async move { agent.start_member(req, sink, &cancel).await.map(drop) })
        })))
    }

    type AbortRestoreStream = Stream_<pb::NodeRestoreProgress>;

    async fn abort_restore(
        &self,
        request: Request<pb::AbortRestoreRequest>,
    ) -> std::result::Result<Response<Self::AbortRestoreStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.stream(move |agent, sink, _| {
            Box::pin(async move { agent.abort(&req.restore_id, &req.reason, sink).await })
        })))
    }

    async fn get_restore_state(
        &self,
        request: Request<pb::GetRestoreStateRequest>,
    ) -> std::result::Result<Response<pb::NodeRestoreState>, Status> {
        Ok(Response::new(
            self.agent.state(&request.into_inner().restore_id).await?,
        ))
    }
}
