//! `Backup.Restore`: the coordinator, one function per phase (the diagram
//! in [`crate::restore`]). `Coordinator::run` reads as the phases in
//! order; a failure anywhere ends in `Coordinator::rollback`
//! ([`crate::restore::rollback`]), which says where each node stands.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::backup_client::BackupClient;
use bulwark_api::backup::v1::restore_agent_client::RestoreAgentClient;
use bulwark_common::shutdown::Shutdown;
use bulwark_common::tls::TlsMaterial;
use chrono::Utc;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::transport::Channel;

use crate::engine::Engine;
use crate::error::{BackupError, Result};
use crate::restore::pitr::{BuildEvent, BuiltTarget, Plan, Target};
use crate::restore::preflight::{Problem, target_size_estimate, unanswered};
use crate::restore::record::{RecordState, RecordWriter, RestoreRecord};
use crate::restore::rollback::abort_node;
use crate::restore::timing::{Timings, phase_label};
use crate::schedule::service::{RestoreRunning, Service};
use crate::snapshot::manifest::timestamp;
use crate::verify::workdir::WorkDir;

pub(super) type Stream_<T> =
    Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// Default revision bump where etcdutl supports it.
pub const DEFAULT_BUMP: u64 = 1_000_000_000;

/// Coordinates restores from this instance.
#[derive(Clone)]
pub struct Coordinator {
    pub(super) service: Arc<Service>,
    pub(super) peers: Vec<String>,
    client_tls: Arc<TlsMaterial>,
    /// This node's agent, which serves a point-in-time target built here.
    local: Arc<crate::restore::agent::Agent>,
    /// The daemon's tracker: shutdown waits for a running restore (within
    /// its grace period; see [`Coordinator::start`]).
    pub(super) tasks: TaskTracker,
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
pub(super) struct Events {
    tx: mpsc::Sender<std::result::Result<pb::RestoreProgress, Status>>,
    restore_id: String,
    timings: std::sync::Mutex<Timings>,
    /// `restores/<id>.json`, kept up to date as the restore goes.
    pub(super) record: RecordWriter,
}

impl Events {
    /// Events of restore `restore_id` sent on `tx`; the clock starts with
    /// `earlier` (a resumed restore's finished phases) and `record` is kept.
    pub(super) fn new(
        tx: mpsc::Sender<std::result::Result<pb::RestoreProgress, Status>>,
        restore_id: String,
        earlier: &[crate::restore::record::TimingRecord],
        record: RecordWriter,
    ) -> Self {
        Self {
            tx,
            restore_id,
            timings: std::sync::Mutex::new(Timings::resumed(earlier)),
            record,
        }
    }

    fn timings(&self) -> std::sync::MutexGuard<'_, Timings> {
        self.timings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the running phase's clock and starts `name`'s.
    pub(super) fn enter_phase(&self, name: &str) {
        self.timings().enter(&self.restore_id, name);
    }

    /// The finished phases' and steps' times, the running phase's clock
    /// left running.
    pub(super) fn timings_so_far(&self) -> Vec<pb::PhaseTiming> {
        self.timings().so_far()
    }

    /// Every phase's and step's time so far.
    pub(super) fn finish_timings(&self) -> Vec<pb::PhaseTiming> {
        self.timings().finish(&self.restore_id)
    }

    pub(super) async fn send(&self, event: pb::restore_progress::Event) {
        if let pb::restore_progress::Event::Node(ev) = &event {
            let timings = {
                let mut t = self.timings();
                t.node_event(&self.restore_id, ev);
                t.so_far()
            };
            self.record.update(|r| {
                r.node_event(ev);
                r.set_timings(&timings);
            });
        }
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

    pub(super) async fn phase(
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
pub(super) struct Failed {
    /// The cause's status code when it says what the request got wrong
    /// (a target that is not covered: INVALID_ARGUMENT; a snapshot that
    /// does not exist: NOT_FOUND), so `bulwarkctl` exits as for the same
    /// status; `None`: a failure of the restore itself.
    pub(super) code: Option<tonic::Code>,
    pub(super) phase: pb::RestorePhase,
    pub(super) error: String,
}

fn fail(phase: pb::RestorePhase) -> impl Fn(BackupError) -> Failed {
    move |e| Failed {
        code: None,
        phase,
        error: e.to_string(),
    }
}

fn status_fail(phase: pb::RestorePhase, node: &str) -> impl Fn(Status) -> Failed + '_ {
    move |s| Failed {
        code: None,
        phase,
        error: format!("node {node}: {}", s.message()),
    }
}

impl Coordinator {
    /// A coordinator driving the agents at `peers` with `client_tls`; its
    /// restores are tasks of `shutdown`'s tracker.
    pub fn new(
        service: Arc<Service>,
        peers: Vec<String>,
        client_tls: TlsMaterial,
        local: Arc<crate::restore::agent::Agent>,
        shutdown: &Shutdown,
    ) -> Self {
        Self {
            service,
            peers,
            client_tls: Arc::new(client_tls),
            local,
            tasks: shutdown.tracker().clone(),
        }
    }

    /// A `Backup` client for the instance at `address` (the schedule
    /// leader, for what only it knows), with the agents' client identity.
    pub fn backup_client(&self, address: &str) -> Result<BackupClient<Channel>> {
        let ch = bulwark_common::grpc::channel(address, &self.client_tls, None)
            .map_err(|e| BackupError::InvalidArgument(format!("leader address {address}: {e}")))?;
        Ok(BackupClient::new(ch))
    }

    /// The agent at `address` and its node's facts; what went wrong, as
    /// the pre-flight words it, when it cannot be dialled or does not
    /// answer.
    pub(super) async fn ask_node(&self, address: &str) -> std::result::Result<Node, String> {
        let mut c = self.client(address).map_err(|e| e.to_string())?;
        let info = c
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .map_err(|s| unanswered(&s))?
            .into_inner();
        Ok((info, c))
    }

    pub(super) fn client(&self, address: &str) -> Result<RestoreAgentClient<Channel>> {
        let ch = bulwark_common::grpc::channel(address, &self.client_tls, None)
            .map_err(|e| BackupError::InvalidArgument(format!("agent address {address}: {e}")))?;
        Ok(RestoreAgentClient::new(ch))
    }

    /// Validates `req` and starts the restore; the stream carries its events.
    ///
    /// The restore is a task of the daemon's tracker, under a child of
    /// `shutdown`: at shutdown a target build stops at once (and the
    /// untouched nodes are released), and the daemon waits for the rest
    /// within its grace period. A restore cut off there is safe: each
    /// agent's journal and this restore's record let the restarted daemon
    /// resume it (every member restored) or roll every node back.
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
        self.tasks.spawn(async move {
            let guard = match this.service.try_restore_lock() {
                Ok(g) => g,
                Err(e) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            };
            let restore_id = format!(
                "{}-{}",
                crate::store::layout::format_time(Utc::now()),
                crate::store::layout::random_suffix()
            );
            let engine = this.service.engine().clone();
            let first = RestoreRecord::started(&restore_id, &engine.node_name, Utc::now());
            let events = Events::new(
                tx,
                restore_id.clone(),
                &[],
                RecordWriter::start(engine, first),
            );
            this.run(req, snapshot, target, &events, &cancel).await;
            this.service.set_restore(None);
            drop(guard);
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Publishes the phase a restore is in (status).
    pub(super) fn set_phase(&self, run: &Run<'_>, phase: pb::RestorePhase) {
        let label = phase_label(phase);
        run.events.enter_phase(&label);
        let timings = run.events.timings_so_far();
        run.events.record.update(|r| {
            r.phase = label;
            r.set_timings(&timings);
        });
        self.service.set_restore(Some(RestoreRunning {
            restore_id: run.rid.clone(),
            started_at: run.started_at,
            phase: phase as i32,
            phase_started_at: Utc::now(),
            timings: run.events.timings_so_far(),
        }));
    }

    /// One restore, phase by phase; on failure, the rollback.
    async fn run(
        &self,
        req: pb::RestoreRequest,
        snapshot: Option<String>,
        target: Target,
        events: &Events,
        cancel: &CancellationToken,
    ) {
        let mut run = Run {
            rid: events.restore_id.clone(),
            started: Instant::now(),
            started_at: Utc::now(),
            engine: self.service.engine().clone(),
            events,
            cancel,
            prepared: Vec::new(),
            touched: false,
        };
        tracing::info!(restore_id = %run.rid, ?target, dry_run = req.dry_run, "restore starting");
        match self.phases(&mut run, &req, snapshot, target).await {
            Ok(summary) => self.finish(&run, summary).await,
            Err(f) => self.rollback(&run, f).await,
        }
    }

    /// PLAN, then (point-in-time) BUILD, then the members'
    /// phases, VERIFY.
    async fn phases(
        &self,
        run: &mut Run<'_>,
        req: &pb::RestoreRequest,
        snapshot: Option<String>,
        target: Target,
    ) -> std::result::Result<pb::RestoreSummary, Failed> {
        let planned = self.plan(run, req, snapshot, target).await?;
        let staged = self.stage(run, &planned).await?;
        let outcome = self.on_members(run, req, &planned, &staged.source).await;
        // A built target is only for this restore's members.
        drop(staged.served);
        let members_started = outcome?;
        let mut summary = pb::RestoreSummary {
            cluster_id: 0,
            revision: staged.revision.unwrap_or(planned.plan.base.revision),
            snapshot_id: planned.plan.base.id.clone(),
            deltas_applied: staged.segments_applied,
            took: None,
            nodes: Vec::new(),
            dry_run: req.dry_run,
            live_revision: 0,
            timings: Vec::new(),
            timeline: if req.dry_run {
                0
            } else {
                planned.plan.next_timeline
            },
            from_timeline: planned.plan.timeline,
        };
        if members_started {
            verify_cluster(run, &planned.nodes, staged.revision, &mut summary).await?;
        }
        Ok(summary)
    }

    /// What the members restore from. Snapshot only: the committed
    /// snapshot object itself, which every agent fetches and decodes
    /// straight into its staging file, checking both hashes (nothing is
    /// downloaded, built or uploaded here). Point in time: the target
    /// built once here (BUILD) and served by this node's agent
    /// (`FetchTarget`) to the others, which stream it, and to itself,
    /// which copies it: it never goes through the store.
    async fn stage(&self, run: &Run<'_>, planned: &Planned) -> std::result::Result<Staged, Failed> {
        let plan = &planned.plan;
        if !plan.replays() {
            let b = &plan.base;
            let revision = plan.target_revision;
            run.events
                .record
                .update(|r| r.revision = revision.unwrap_or(b.revision));
            return Ok(Staged {
                source: stored_source(b),
                served: None,
                revision,
                segments_applied: 0,
            });
        }
        let (built, work) = self.build(run, plan).await?;
        // The other nodes dial this one where `restore.peers` (the same
        // list on every node) names it; a coordinator outside that list
        // serves at its own advertised address.
        let me = &run.engine.node_name;
        let served_by = planned
            .nodes
            .iter()
            .find(|(info, _)| &info.node_name == me)
            .map_or_else(
                || self.local.address().to_owned(),
                |(info, _)| info.agent_address.clone(),
            );
        let (offer, source) = self.local.offer_target(
            &run.rid,
            &built.path,
            (built.sha256.clone(), built.size),
            served_by,
        );
        Ok(Staged {
            source,
            served: Some((offer, work)),
            revision: built.revision,
            segments_applied: built.segments_applied,
        })
    }

    /// PLAN: every agent answers and is free; the snapshot and deltas are
    /// chosen; the members' common spec is settled and announced.
    async fn plan(
        &self,
        run: &Run<'_>,
        req: &pb::RestoreRequest,
        snapshot: Option<String>,
        target: Target,
    ) -> std::result::Result<Planned, Failed> {
        self.set_phase(run, pb::RestorePhase::Plan);
        let (nodes, problems) = self.node_infos().await;
        let plan = run
            .engine
            .plan_restore_on(snapshot.as_deref(), target, req.timeline)
            .await
            .map_err(|e| {
                let error = e.to_string();
                Failed {
                    code: Some(Status::from(e).code()),
                    phase: pb::RestorePhase::Plan,
                    error,
                }
            })?;
        run.events.record.update(|r| {
            r.snapshot_id = plan.base.id.clone();
            r.revision = plan.target_revision.unwrap_or(0);
            r.from_cluster_id = plan.base.cluster_id();
        });
        let lacking_bump: Vec<&str> = nodes
            .iter()
            .filter(|(n, _)| {
                !n.etcdutl
                    .as_ref()
                    .is_some_and(|e| e.bump_revision && e.mark_compacted)
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
        if req.skip_space_check {
            warnings.push(
                "the nodes' free-space check is skipped (--skip-space-check): a node whose \
                 disk fills up while it fetches or rebuilds its member fails the restore \
                 before any etcd stops"
                    .to_owned(),
            );
        }
        let planned = Planned {
            initial_cluster: nodes
                .iter()
                .flat_map(|(n, _)| {
                    n.peer_urls
                        .iter()
                        .map(move |u| format!("{}={u}", n.member_name))
                })
                .collect::<Vec<_>>()
                .join(","),
            token: if req.cluster_token.is_empty() {
                format!("bulwark-restore-{}", run.rid)
            } else {
                req.cluster_token.clone()
            },
            bump,
            mark_compacted: req.mark_compacted.unwrap_or(bump > 0),
            nodes,
            plan,
        };
        let check = pb::CheckRestoreRequest {
            restore_id: run.rid.clone(),
            target_size_bytes: target_size_estimate(&planned.plan),
            bump_revision: planned.bump,
            mark_compacted: planned.mark_compacted,
            skip_space_check: req.skip_space_check,
            // Every node decodes a stored snapshot itself.
            key_id: if planned.plan.replays() {
                String::new()
            } else {
                planned
                    .plan
                    .base
                    .encryption
                    .key_id()
                    .unwrap_or_default()
                    .to_owned()
            },
        };
        self.preflight(run, &check, &planned.nodes, problems)
            .await?;
        run.events
            .send(pb::restore_progress::Event::Plan(planned.announce(
                &run.rid,
                target,
                req.dry_run,
                warnings,
            )))
            .await;
        Ok(planned)
    }

    /// Every peer's agent, asked for its node's facts, all at once; one
    /// that does not answer, or is held by another restore, is a problem
    /// the pre-flight reports with the others.
    async fn node_infos(&self) -> (Vec<Node>, Vec<Problem>) {
        let asks = self.peers.iter().map(|address| self.ask_node(address));
        let mut nodes = Vec::new();
        let mut problems = Vec::new();
        for (address, answer) in self.peers.iter().zip(futures::future::join_all(asks).await) {
            match answer {
                Ok((info, _)) if !info.restore_in_progress.is_empty() => problems.push(Problem {
                    what: format!(
                        "the node is held by restore {} (see `bulwarkctl restore status {}`)",
                        info.restore_in_progress, info.restore_in_progress
                    ),
                    node: info.node_name,
                }),
                Ok((mut info, client)) => {
                    // As the coordinator, and every node (they share
                    // `restore.peers`), reaches it: its own advertised
                    // address may be a wildcard.
                    info.agent_address.clone_from(address);
                    nodes.push((info, client));
                }
                Err(what) => problems.push(Problem {
                    node: format!("at {address}"),
                    what,
                }),
            }
        }
        (nodes, problems)
    }

    /// DOWNLOAD + BUILD: the target snapshot, built once in a work dir
    /// (returned with it, so it lives until the members have fetched it). Every
    /// check on the stored data fails here, before any node is touched.
    async fn build(
        &self,
        run: &Run<'_>,
        plan: &Plan,
    ) -> std::result::Result<(BuiltTarget, WorkDir), Failed> {
        self.set_phase(run, pb::RestorePhase::Download);
        let engine = &run.engine;
        let work = WorkDir::new(&engine.drill, "bulwark-restore-")
            .map_err(fail(pb::RestorePhase::Download))?;
        let events = run.events;
        let target_revision = plan.target_revision;
        let on_build = |e: BuildEvent| match e {
            BuildEvent::Download {
                bytes_done,
                bytes_total,
                elapsed,
            } => events.try_send(pb::restore_progress::Event::Phase(
                pb::RestorePhaseProgress {
                    phase: pb::RestorePhase::Download as i32,
                    transfer: Some(pb::TransferProgress {
                        bytes_done,
                        bytes_total: Some(bytes_total),
                        bytes_per_second: (bytes_done as f64 / elapsed.as_secs_f64().max(0.001))
                            as u64,
                        elapsed: Some(d(elapsed)),
                    }),
                    revision: None,
                },
            )),
            BuildEvent::Replay {
                revision,
                events: applied,
            } => {
                events.record.update(|r| {
                    r.progress = replay_text(revision, target_revision, applied);
                });
                events.try_send(pb::restore_progress::Event::Phase(
                    pb::RestorePhaseProgress {
                        phase: pb::RestorePhase::Build as i32,
                        transfer: None,
                        revision: Some(revision),
                    },
                ));
            }
        };
        let built = engine
            .build_target(plan, work.path(), &on_build, run.cancel)
            .await
            .map_err(|e| Failed {
                code: None,
                phase: if matches!(e, BackupError::Corrupt { .. }) {
                    pb::RestorePhase::Download
                } else {
                    pb::RestorePhase::Build
                },
                error: format!("{e} (no node was touched)"),
            })?;
        events.record.update(|r| r.progress.clear());
        events
            .phase(pb::RestorePhase::Build, None, built.revision)
            .await;
        let revision = built.revision.unwrap_or(plan.base.revision);
        events.record.update(|r| r.revision = revision);
        Ok((built, work))
    }

    /// PREPARE, then (unless a dry run) RESTORE and START. `Ok(true)` when
    /// the members were started.
    async fn on_members(
        &self,
        run: &mut Run<'_>,
        req: &pb::RestoreRequest,
        planned: &Planned,
        source: &pb::SnapshotSource,
    ) -> std::result::Result<bool, Failed> {
        self.prepare(run, req, planned, source).await?;
        if req.dry_run {
            return Ok(false);
        }
        self.restore_members(run, planned, source).await?;
        self.start_members(run, &planned.nodes).await?;
        Ok(true)
    }

    /// PREPARE: every agent at once fetches the target, checks it,
    /// restores its member beside the running one and takes its lock. Every agent asked is remembered for the rollback,
    /// even one whose prepare failed (it may hold the lock).
    async fn prepare(
        &self,
        run: &mut Run<'_>,
        req: &pb::RestoreRequest,
        planned: &Planned,
        source: &pb::SnapshotSource,
    ) -> std::result::Result<(), Failed> {
        self.set_phase(run, pb::RestorePhase::Prepare);
        run.prepared = planned.nodes.clone();
        let (rid, coordinator, events) = (&run.rid, &run.engine.node_name, run.events);
        let asks = planned.nodes.iter().map(|(info, c)| async move {
            let req = pb::PrepareRestoreRequest {
                restore_id: rid.clone(),
                coordinator: coordinator.clone(),
                spec: Some(planned.spec(info, source)),
                lock_ttl: Some(d(Duration::from_secs(600))),
                skip_space_check: req.skip_space_check,
            };
            prepare_node(c.clone(), req, info, events)
                .await
                .map_err(status_fail(pb::RestorePhase::Prepare, &info.node_name))
        });
        first_failure(futures::future::join_all(asks).await)
    }

    /// RESTORE: every node at once, each agent's steps relayed. From here
    /// on a failure leaves something to roll back.
    ///
    /// The old cluster's leader stops last: etcd's leader, stopped while
    /// its followers still run, first tries to hand its leadership to one
    /// of them, and when they are stopping too that waits out etcd's
    /// request timeout (seconds). So the leader's node starts once every
    /// other node's etcd is down, and not at all when another node's
    /// restore failed. That wait costs only the followers' stop: every
    /// member was rebuilt in PREPARE, and here each node only stops etcd,
    /// sets its data dir aside and renames the prebuilt member into place.
    async fn restore_members(
        &self,
        run: &mut Run<'_>,
        planned: &Planned,
        source: &pb::SnapshotSource,
    ) -> std::result::Result<(), Failed> {
        self.set_phase(run, pb::RestorePhase::RestoreMembers);
        run.events
            .phase(pb::RestorePhase::RestoreMembers, None, None)
            .await;
        run.touched = true;
        let leader = old_leader(run, &planned.nodes).await;
        let others = planned
            .nodes
            .iter()
            .filter(|(i, _)| Some(i.member_id) != leader)
            .count();
        let leader = leader.filter(|_| others > 0);
        // Followers whose etcd is down (or whose restore ended), and
        // whether any of them failed.
        let (stopped, wait) = tokio::sync::watch::channel((0usize, false));
        let (rid, events) = (&run.rid, run.events);
        let restores = planned.nodes.iter().map(|(info, c)| {
            let is_leader = Some(info.member_id) == leader;
            let (stopped, mut wait) = (&stopped, wait.clone());
            async move {
                if is_leader {
                    let ready = wait.wait_for(|(n, _)| *n >= others).await;
                    if ready.map(|r| r.1).unwrap_or(true) {
                        // Another node failed: this one is left untouched.
                        return Ok(());
                    }
                }
                let counted = std::sync::atomic::AtomicBool::new(is_leader);
                let count = |failed: bool| {
                    if !counted.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        stopped.send_modify(|(n, f)| {
                            *n += 1;
                            *f |= failed;
                        });
                    }
                };
                let result = self
                    .restore_member(c.clone(), rid, planned.spec(info, source), events, &|ev| {
                        if ev.step == pb::NodeStep::WaitStopped as i32
                            && ev.status == pb::StepStatus::Done as i32
                        {
                            count(false);
                        }
                    })
                    .await
                    .map_err(status_fail(
                        pb::RestorePhase::RestoreMembers,
                        &info.node_name,
                    ));
                count(result.is_err());
                result
            }
        });
        first_failure(futures::future::join_all(restores).await)
    }

    /// RestoreMember on one node, its steps relayed, each also shown to
    /// `seen`.
    async fn restore_member(
        &self,
        mut c: RestoreAgentClient<Channel>,
        rid: &str,
        spec: pb::MemberRestoreSpec,
        events: &Events,
        seen: &(dyn Fn(&pb::NodeRestoreProgress) + Sync),
    ) -> std::result::Result<(), Status> {
        let mut stream = c
            .restore_member(pb::RestoreMemberRequest {
                restore_id: rid.to_owned(),
                spec: Some(spec),
                dry_run: false,
            })
            .await?
            .into_inner();
        while let Some(ev) = stream.message().await? {
            seen(&ev);
            events.send(pb::restore_progress::Event::Node(ev)).await;
        }
        Ok(())
    }

    /// START: all members at once (a member is healthy only with a quorum).
    pub(super) async fn start_members(
        &self,
        run: &Run<'_>,
        nodes: &[Node],
    ) -> std::result::Result<(), Failed> {
        self.set_phase(run, pb::RestorePhase::StartMembers);
        let events = run.events;
        events
            .phase(pb::RestorePhase::StartMembers, None, None)
            .await;
        let starts = nodes.iter().map(|(info, c)| {
            let mut c = c.clone();
            let rid = run.rid.clone();
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
        first_failure(futures::future::join_all(starts).await)
    }

    /// The end of a restore that did not fail: a dry run releases the
    /// nodes; the summary is sent.
    pub(super) async fn finish(&self, run: &Run<'_>, mut summary: pb::RestoreSummary) {
        if summary.dry_run {
            // Release the nodes' locks and staged files.
            for (info, c) in &run.prepared {
                let _ = abort_node(c.clone(), &run.rid, "dry run finished", run.events, info).await;
            }
        }
        summary.took = Some(d(run.started.elapsed()));
        summary.timings = run.events.finish_timings();
        crate::metrics::restore_finished(if summary.dry_run { "dry_run" } else { "done" });
        // A done record is the restore point later coverage starts from.
        run.events
            .record
            .finish(|r| {
                r.state = if summary.dry_run {
                    RecordState::DryRun
                } else {
                    RecordState::Done
                };
                r.finished_at = Some(Utc::now());
                r.snapshot_id = summary.snapshot_id.clone();
                r.revision = summary.revision;
                r.cluster_id = summary.cluster_id;
                r.set_timings(&summary.timings);
            })
            .await;
        if !summary.dry_run && summary.cluster_id != 0 {
            record_made_cluster(run, &summary).await;
        }
        tracing::info!(restore_id = %run.rid, revision = summary.revision, "restore finished");
        run.events
            .send(pb::restore_progress::Event::Done(summary))
            .await;
    }
}

/// Writes down the cluster a finished restore made (`clusters/<id>.json`),
/// unless its first snapshot did already. The timelines go by the restore
/// record; this one only says to a reader of the store where the cluster
/// came from, so failing to write it is logged, not fatal.
async fn record_made_cluster(run: &Run<'_>, summary: &pb::RestoreSummary) {
    let record = crate::snapshot::clusters::ClusterRecord {
        cluster_id: summary.cluster_id,
        first_seen_at: Utc::now(),
        first_revision: summary.revision,
        first_snapshot_id: String::new(),
        restore_id: run.rid.clone(),
        back_filled: false,
    };
    if let Err(e) = run.engine.record_cluster(&record).await {
        tracing::warn!(restore_id = %run.rid, error = %e, "could not record the restored etcd cluster");
    }
}

/// VERIFY: the restored members answer, and hold at least the target
/// revision (more with a bump, or new writes); the summary gets the
/// cluster's id, revision and members.
pub(super) async fn verify_cluster(
    run: &Run<'_>,
    nodes: &[Node],
    target_revision: Option<i64>,
    summary: &mut pb::RestoreSummary,
) -> std::result::Result<(), Failed> {
    run.events.enter_phase("check");
    // START MEMBERS' time in the record says the check is under way
    // (`restore status`), however long a member takes to answer.
    let timings = run.events.timings_so_far();
    run.events.record.update(|r| r.set_timings(&timings));
    let urls: Vec<String> = nodes
        .iter()
        .flat_map(|(n, _)| n.client_urls.clone())
        .collect();
    let statuses = run
        .engine
        .etcd
        .with_endpoints(urls)
        .statuses()
        .await
        .unwrap_or_default();
    let Some(s) = statuses.first() else {
        return Err(Failed {
            code: None,
            phase: pb::RestorePhase::StartMembers,
            error: "no restored member answers its status call".into(),
        });
    };
    if let Some(r) = target_revision
        && s.revision < r
    {
        return Err(Failed {
            code: None,
            phase: pb::RestorePhase::StartMembers,
            error: format!(
                "the restored cluster is at revision {}, the target was {r}",
                s.revision
            ),
        });
    }
    // `revision` stays the one restored: the live one is past it by the
    // bump and by the writes made since (bulwark-backup's election keys
    // among them).
    summary.cluster_id = s.cluster_id;
    summary.live_revision = s.revision;
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
            data_dir_aside_path: format!("{}.bulwark-{}", n.data_dir, run.rid),
        })
        .collect();
    Ok(())
}

/// The old cluster's leader among `nodes` (its member id), when a member
/// answers and knows one.
async fn old_leader(run: &Run<'_>, nodes: &[Node]) -> Option<u64> {
    let urls: Vec<String> = nodes
        .iter()
        .flat_map(|(n, _)| n.client_urls.clone())
        .collect();
    // Members that do not answer soon have no leader to wait for.
    let members = run.engine.etcd.with_endpoints(urls);
    let statuses = tokio::time::timeout(Duration::from_secs(5), members.statuses())
        .await
        .ok()?
        .ok()?;
    statuses.iter().map(|s| s.leader).find(|l| *l != 0)
}

/// PREPARE on one node, its fetch's events relayed as they come (bytes
/// fetched included). An agent without `PrepareRestoreStream` (an older
/// version, mid-upgrade) is asked the unary way, its fetch timed here.
async fn prepare_node(
    mut c: RestoreAgentClient<Channel>,
    req: pb::PrepareRestoreRequest,
    info: &pb::NodeInfo,
    events: &Events,
) -> std::result::Result<(), Status> {
    match c.prepare_restore_stream(req.clone()).await {
        Ok(stream) => return relay(stream.into_inner(), events).await,
        Err(s) if s.code() == tonic::Code::Unimplemented => {}
        Err(s) => return Err(s),
    }
    let ev = |status: pb::StepStatus, path: String| {
        pb::restore_progress::Event::Node(pb::NodeRestoreProgress {
            restore_id: req.restore_id.clone(),
            node_name: info.node_name.clone(),
            step: pb::NodeStep::FetchSnapshot as i32,
            status: status as i32,
            detail: String::new(),
            path,
            transfer: None,
            at: Some(timestamp(Utc::now())),
        })
    };
    events
        .send(ev(pb::StepStatus::Started, String::new()))
        .await;
    let staged = c.prepare_restore(req.clone()).await?.into_inner();
    events
        .send(ev(pb::StepStatus::Done, staged.staged_snapshot_path))
        .await;
    Ok(())
}

/// "replayed to revision 5004 of 7006, 12000 events" (`restore status`).
fn replay_text(revision: i64, target: Option<i64>, events: u64) -> String {
    match target {
        Some(t) => format!("replayed to revision {revision} of {t}, {events} events"),
        None => format!("replayed to revision {revision}, {events} events"),
    }
}

/// Every node's outcome of a step they ran at once: the failure names
/// every node that failed (one after the other), else none.
fn first_failure(results: Vec<std::result::Result<(), Failed>>) -> std::result::Result<(), Failed> {
    let mut failed = results.into_iter().filter_map(|r| r.err());
    let Some(mut first) = failed.next() else {
        return Ok(());
    };
    for f in failed {
        first.error.push_str("; ");
        first.error.push_str(&f.error);
    }
    Err(first)
}

/// The committed snapshot `b` as the agents fetch it: they decode it
/// themselves and check it against its manifest.
fn stored_source(b: &crate::snapshot::manifest::Manifest) -> pb::SnapshotSource {
    pb::SnapshotSource {
        object_key: b.object_key.clone(),
        sha256: b.stored_sha256.clone(),
        size_bytes: b.stored_size_bytes,
        snapshot_id: b.id.clone(),
        raw_size_bytes: b.raw_size_bytes,
        served_by: String::new(),
    }
}

/// What the members restore from (see `Coordinator::stage`).
struct Staged {
    source: pb::SnapshotSource,
    /// A built target's offer to the agents and its work dir, both gone
    /// once the members are done with it.
    served: Option<(crate::restore::agent::Offer, WorkDir)>,
    /// The target's revision, when known exactly.
    revision: Option<i64>,
    /// Delta segments applied.
    segments_applied: u32,
}

/// A node's facts and a client for its agent.
pub(super) type Node = (pb::NodeInfo, RestoreAgentClient<Channel>);

/// One restore in progress: what its phases share.
pub(super) struct Run<'a> {
    pub(super) rid: String,
    pub(super) started: Instant,
    pub(super) started_at: chrono::DateTime<Utc>,
    pub(super) engine: Arc<Engine>,
    pub(super) events: &'a Events,
    pub(super) cancel: &'a CancellationToken,
    /// Every agent asked to prepare: the rollback's list.
    pub(super) prepared: Vec<Node>,
    /// Whether RESTORE began (something on a node may have changed).
    pub(super) touched: bool,
}

/// What PLAN settled: the nodes, the plan and the members' common spec.
struct Planned {
    nodes: Vec<Node>,
    plan: Plan,
    initial_cluster: String,
    token: String,
    bump: u64,
    mark_compacted: bool,
}

impl Planned {
    /// Node `n`'s restore spec.
    fn spec(&self, n: &pb::NodeInfo, source: &pb::SnapshotSource) -> pb::MemberRestoreSpec {
        pb::MemberRestoreSpec {
            snapshot: Some(source.clone()),
            member_name: n.member_name.clone(),
            peer_urls: n.peer_urls.clone(),
            initial_cluster: self.initial_cluster.clone(),
            cluster_token: self.token.clone(),
            bump_revision: self.bump,
            mark_compacted: self.mark_compacted,
        }
    }

    /// The plan as announced to the caller.
    fn announce(
        &self,
        rid: &str,
        target: Target,
        dry_run: bool,
        warnings: Vec<String>,
    ) -> pb::RestorePlan {
        pb::RestorePlan {
            snapshot: Some(self.plan.base.to_proto(None)),
            deltas: self.plan.segments.iter().map(|s| s.to_proto()).collect(),
            target_revision: self.plan.target_revision.unwrap_or(0),
            target_time: match target {
                Target::Time(t) => Some(timestamp(t)),
                _ => None,
            },
            nodes: self
                .nodes
                .iter()
                .map(|(n, _)| pb::PlannedNode {
                    data_dir_aside_path: format!("{}.bulwark-{rid}", n.data_dir),
                    info: Some(n.clone()),
                })
                .collect(),
            initial_cluster: self.initial_cluster.clone(),
            cluster_token: self.token.clone(),
            bump_revision: self.bump,
            mark_compacted: self.mark_compacted,
            dry_run,
            warnings,
        }
    }
}

/// Relays a node's step stream until it ends; an rpc error is the failure.
pub(super) async fn relay(
    mut stream: tonic::Streaming<pb::NodeRestoreProgress>,
    events: &Events,
) -> std::result::Result<(), Status> {
    while let Some(ev) = stream.message().await? {
        events.send(pb::restore_progress::Event::Node(ev)).await;
    }
    Ok(())
}
