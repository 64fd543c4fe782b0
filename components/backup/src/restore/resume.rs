//! Finishing a restore that stopped half-way (its coordinator died):
//! `Backup.ResumeRestore`, `Backup.RollbackRestore`, and a restarted
//! coordinator's own pass over the restores its record says it was running
//! ([`Coordinator::recover`]).
//!
//! ```text
//! STATE    GetNodeInfo + GetRestoreState on every agent in restore.peers
//! resume:  every node holds the restore with its member restored
//!            ─▶ START MEMBERS ─▶ CHECK ─▶ done (the restore point is recorded)
//!          anything else (a node not restored, one that does not answer)
//!            ─▶ ROLLBACK on every node
//! rollback: ROLLBACK on every node
//! ```
//!
//! A restarted agent has already released or rolled back a node whose
//! member it had not restored (see the agent's journal), so the cluster
//! ends restored on every node or original on every node.

use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;
use chrono::Utc;
use futures::StreamExt as _;
use object_store::ObjectStoreExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::coordinator::{Coordinator, Events, Failed, Node, Run, Stream_, verify_cluster};
use super::preflight::unanswered;
use super::record::{RecordState, RecordWriter, RestoreRecord};

/// How often, and how far apart, a restarted coordinator asks agents that
/// do not answer yet (their hosts may be restarting too) before deciding.
const STATE_ATTEMPTS: u32 = 5;
const STATE_PAUSE: Duration = Duration::from_secs(3);

/// Every node's answer for one restore.
struct NodeStates {
    /// Nodes whose agent answered.
    nodes: Vec<Node>,
    /// Each answering node's state of the restore; `None`: it holds nothing
    /// for it (never prepared, released, or rolled back).
    states: Vec<(String, Option<pb::NodeRestoreState>)>,
    /// Agents that did not answer.
    unreachable: Vec<String>,
}

/// Why `s` cannot be resumed; `None`: every node holds the restore with
/// its member restored.
fn not_resumable(s: &NodeStates) -> Option<String> {
    let mut why: Vec<String> = s
        .unreachable
        .iter()
        .map(|u| format!("the agent {u}"))
        .collect();
    for (node, state) in &s.states {
        match state {
            Some(st) if st.restored => {}
            Some(_) => why.push(format!("node {node} (its member is not restored)")),
            None => why.push(format!("node {node} (it holds nothing for this restore)")),
        }
    }
    (!why.is_empty()).then(|| {
        format!(
            "cannot resume: not every node has its member restored: {}; rolling every node back",
            why.join(", ")
        )
    })
}

impl Coordinator {
    /// ResumeRestore (`rollback` false) or RollbackRestore (true) of
    /// `restore_id`; the stream carries its events.
    pub fn finish_restore(
        &self,
        restore_id: String,
        rollback: bool,
        shutdown: &CancellationToken,
    ) -> std::result::Result<Stream_<pb::RestoreProgress>, Status> {
        if !crate::store::layout::is_valid_id(&restore_id) {
            return Err(Status::invalid_argument(format!(
                "restore_id {:?}: expected letters, digits, '-' or '_'",
                restore_id.chars().take(64).collect::<String>()
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        let cancel = shutdown.child_token();
        self.tasks.spawn(async move {
            if let Err(s) = this
                .finish_run(restore_id, rollback, tx.clone(), &cancel)
                .await
            {
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn finish_run(
        &self,
        rid: String,
        rollback: bool,
        tx: mpsc::Sender<std::result::Result<pb::RestoreProgress, Status>>,
        cancel: &CancellationToken,
    ) -> std::result::Result<(), Status> {
        let guard = self.service.try_restore_lock()?;
        let engine = self.service.engine().clone();
        let record = engine.restore_record(&rid).await?;
        match record.state {
            RecordState::Done => {
                return Err(Status::failed_precondition(format!(
                    "restore {rid} is done: the cluster runs its data (restore again to go elsewhere)"
                )));
            }
            RecordState::DryRun => {
                return Err(Status::failed_precondition(format!(
                    "restore {rid} was a dry run: nothing to finish"
                )));
            }
            RecordState::Running | RecordState::Failed => {}
        }
        tracing::warn!(restore_id = %rid, rollback, phase = %record.phase, "finishing a restore that stopped half-way");
        let mut first = record.clone();
        first.state = RecordState::Running;
        first.finished_at = None;
        first.error.clear();
        first.coordinated_by = engine.node_name.clone();
        let events = Events::new(
            tx,
            rid.clone(),
            &record.timings,
            RecordWriter::start(engine.clone(), first),
        );
        let mut run = Run {
            rid: rid.clone(),
            started: Instant::now(),
            started_at: Utc::now(),
            engine,
            events: &events,
            cancel,
            prepared: Vec::new(),
            touched: true,
        };
        let states = self.node_states(&rid, !rollback).await;
        run.prepared = states.nodes.clone();
        let reason = if rollback {
            Some("rolled back on request (bulwarkctl restore rollback)".to_owned())
        } else {
            not_resumable(&states)
        };
        let failed_phase = super::record::phase_from_label(&record.phase);
        match reason {
            Some(error) => {
                let f = Failed {
                    code: None,
                    phase: failed_phase,
                    error,
                };
                self.rollback(&run, f).await;
            }
            None => match self.resume_members(&run, &states.nodes, &record).await {
                Ok(summary) => self.finish(&run, summary).await,
                Err(f) => self.rollback(&run, f).await,
            },
        }
        // The target a dead coordinator uploaded for the agents is only
        // for this restore.
        let key = format!("{}/restore/{rid}/target.db", run.engine.cluster_name);
        let object = crate::store::layout::object_path(run.engine.store.prefix(), &key);
        match run.engine.store.inner().delete(&object).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, object = %object, "could not delete the restore's target snapshot");
            }
        }
        self.service.set_restore(None);
        drop(guard);
        Ok(())
    }

    /// GetNodeInfo and GetRestoreState on every peer; with `patient`,
    /// agents that do not answer are asked again a few times first.
    async fn node_states(&self, rid: &str, patient: bool) -> NodeStates {
        let attempts = if patient { STATE_ATTEMPTS } else { 1 };
        let mut last = None;
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(STATE_PAUSE).await;
            }
            let s = self.node_states_once(rid).await;
            let done = s.unreachable.is_empty();
            last = Some(s);
            if done {
                break;
            }
        }
        last.unwrap_or(NodeStates {
            nodes: Vec::new(),
            states: Vec::new(),
            unreachable: Vec::new(),
        })
    }

    async fn node_states_once(&self, rid: &str) -> NodeStates {
        let asks = self.peers.iter().map(|address| async move {
            let (info, mut c) = self.ask_node(address).await?;
            let state = match c
                .get_restore_state(pb::GetRestoreStateRequest {
                    restore_id: rid.to_owned(),
                })
                .await
            {
                Ok(s) => Some(s.into_inner()),
                Err(s) if s.code() == tonic::Code::NotFound => None,
                Err(s) => return Err(unanswered(&s)),
            };
            Ok::<_, String>(((info, c), state))
        });
        let mut out = NodeStates {
            nodes: Vec::new(),
            states: Vec::new(),
            unreachable: Vec::new(),
        };
        for (address, answer) in self.peers.iter().zip(futures::future::join_all(asks).await) {
            match answer {
                Ok((node, state)) => {
                    out.states.push((node.0.node_name.clone(), state));
                    out.nodes.push(node);
                }
                Err(e) => out.unreachable.push(format!("at {address} ({e})")),
            }
        }
        out
    }

    /// START MEMBERS and CHECK for a restore whose members are restored.
    async fn resume_members(
        &self,
        run: &Run<'_>,
        nodes: &[Node],
        record: &RestoreRecord,
    ) -> std::result::Result<pb::RestoreSummary, Failed> {
        self.start_members(run, nodes).await?;
        // The record is still running, so the timeline it starts is the
        // one after the newest. Unreadable records only cost the numbers.
        let (timeline, from_timeline) = match run.engine.timelines().await {
            Ok(t) => (
                t.current() + 1,
                match record.from_cluster_id {
                    0 => 0,
                    id => t.of_cluster(id),
                },
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the restore records to name the timeline");
                (0, 0)
            }
        };
        let mut summary = pb::RestoreSummary {
            revision: record.revision,
            snapshot_id: record.snapshot_id.clone(),
            timeline,
            from_timeline,
            ..Default::default()
        };
        let target = (record.revision > 0).then_some(record.revision);
        verify_cluster(run, nodes, target, &mut summary).await?;
        Ok(summary)
    }

    /// After a restart: finishes every restore this instance's record says
    /// it was running when it stopped (resumed where every node's member
    /// is restored, else rolled back). Runs until they are finished.
    pub async fn recover(&self, shutdown: &CancellationToken) {
        let engine = self.service.engine().clone();
        let records = match engine.restore_records().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the restore records to finish an interrupted restore");
                return;
            }
        };
        let mine = records
            .into_iter()
            .filter(|r| r.state == RecordState::Running && r.coordinated_by == engine.node_name);
        for r in mine {
            tracing::warn!(restore_id = %r.restore_id, phase = %r.phase, "restarted while coordinating a restore: finishing it");
            let mut stream = match self.finish_restore(r.restore_id.clone(), false, shutdown) {
                Ok(s) => s,
                Err(s) => {
                    tracing::warn!(restore_id = %r.restore_id, error = %s.message(), "could not finish the interrupted restore");
                    continue;
                }
            };
            while let Some(ev) = stream.next().await {
                match ev.map(|p| p.event) {
                    Ok(Some(pb::restore_progress::Event::Done(_))) => {
                        tracing::info!(restore_id = %r.restore_id, "interrupted restore resumed and finished");
                    }
                    Ok(Some(pb::restore_progress::Event::Failed(f))) => {
                        tracing::warn!(restore_id = %r.restore_id, rolled_back = f.rolled_back, error = %f.message, "interrupted restore rolled back");
                    }
                    Err(s) => {
                        tracing::warn!(restore_id = %r.restore_id, error = %s.message(), "could not finish the interrupted restore");
                    }
                    Ok(_) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(restored: bool) -> Option<pb::NodeRestoreState> {
        Some(pb::NodeRestoreState {
            restored,
            ..Default::default()
        })
    }

    #[test]
    fn only_a_cluster_restored_on_every_node_resumes() {
        let s =
            |states: Vec<(&str, Option<pb::NodeRestoreState>)>, unreachable: &[&str]| NodeStates {
                nodes: Vec::new(),
                states: states.into_iter().map(|(n, s)| (n.to_owned(), s)).collect(),
                unreachable: unreachable.iter().map(|u| (*u).to_owned()).collect(),
            };
        assert_eq!(
            not_resumable(&s(vec![("n0", state(true)), ("n1", state(true))], &[])),
            None
        );
        let why = not_resumable(&s(
            vec![("n0", state(true)), ("n1", state(false)), ("n2", None)],
            &["at 10.0.0.3:9445 (unreachable)"],
        ))
        .unwrap();
        assert!(
            why.contains("the agent at 10.0.0.3:9445 (unreachable)"),
            "{why}"
        );
        assert!(
            why.contains("node n1 (its member is not restored)"),
            "{why}"
        );
        assert!(
            why.contains("node n2 (it holds nothing for this restore)"),
            "{why}"
        );
        assert!(!why.contains("node n0"), "{why}");
    }
}
