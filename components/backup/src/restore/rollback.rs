//! Undoing a failed restore: AbortRestore on every agent that was asked to
//! prepare (newest step first, on the agent), then each node's state, so
//! the failure says where every node stands and what is left to do by hand.

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::restore_agent_client::RestoreAgentClient;
use tonic::Status;
use tonic::transport::Channel;

use super::coordinator::{Coordinator, Events, Failed, Run, relay};
use super::record::RecordState;
use super::timing::phase_label;

impl Coordinator {
    /// ROLLBACK: every prepared node aborted and asked for its state; the
    /// failure sent with them.
    pub(super) async fn rollback(&self, run: &Run<'_>, f: Failed) {
        let rid = &run.rid;
        tracing::warn!(restore_id = %rid, phase = ?f.phase, error = %f.error, "restore failed; rolling back");
        crate::metrics::restore_finished("failed");
        self.set_phase(run, pb::RestorePhase::Rollback);
        let mut rolled_back = true;
        let mut states = Vec::new();
        for (info, c) in &run.prepared {
            if let Err(e) = abort_node(c.clone(), rid, &f.error, run.events, info).await {
                rolled_back = false;
                tracing::warn!(node = %info.node_name, error = %e, "rollback failed");
            }
            let (state, clean) = node_state(c.clone(), rid, info).await;
            rolled_back &= clean;
            states.push(state);
        }
        // Logs and exports the rollback's own time too.
        let timings = run.events.finish_timings();
        let clean = rolled_back || !run.touched;
        run.events
            .record
            .finish(|r| {
                r.state = RecordState::Failed;
                r.finished_at = Some(chrono::Utc::now());
                r.phase = phase_label(f.phase);
                r.error = f.error.clone();
                r.rolled_back = clean;
                r.set_timings(&timings);
            })
            .await;
        run.events
            .send(pb::restore_progress::Event::Failed(pb::RestoreFailure {
                phase: f.phase as i32,
                code: f.code.map_or(0, i32::from),
                message: f.error,
                nodes: states,
                rolled_back: clean,
                rollback_instructions: instructions(run.touched, rolled_back),
            }))
            .await;
    }
}

/// A node's state after its abort, and whether it is clean: an agent that
/// no longer knows the restore released everything; one that still holds
/// it, or does not answer, needs a look.
async fn node_state(
    mut c: RestoreAgentClient<Channel>,
    rid: &str,
    info: &pb::NodeInfo,
) -> (pb::NodeRestoreState, bool) {
    match c
        .get_restore_state(pb::GetRestoreStateRequest {
            restore_id: rid.to_owned(),
        })
        .await
    {
        Ok(s) => (s.into_inner(), false),
        Err(s) if s.code() == tonic::Code::NotFound => (
            pb::NodeRestoreState {
                node_name: info.node_name.clone(),
                manifest_in_place: true,
                restore_id: rid.to_owned(),
                ..Default::default()
            },
            true,
        ),
        Err(s) => (
            pb::NodeRestoreState {
                node_name: info.node_name.clone(),
                error: format!("unreachable: {}", s.message()),
                restore_id: rid.to_owned(),
                ..Default::default()
            },
            false,
        ),
    }
}

/// What the operator is told after a failure.
fn instructions(touched: bool, rolled_back: bool) -> String {
    if !touched {
        "nothing was changed on any node".to_owned()
    } else if rolled_back {
        "every node is back on its original data dir and manifest; the restored data \
         was kept as <dataDir>.bulwark-<restore id>-restored"
            .to_owned()
    } else {
        "some nodes could not be rolled back: run each node's manual_rollback \
         commands, then check etcd with `etcdctl endpoint health`"
            .to_owned()
    }
}

/// AbortRestore on one node, its steps relayed.
pub(super) async fn abort_node(
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
