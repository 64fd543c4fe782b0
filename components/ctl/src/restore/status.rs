//! `bulwarkctl restore status [ID]`: a restore as its coordinator recorded
//! it in the store (`Backup.GetRestore`): state, phase, each phase's and
//! node step's time, and each node's last step. Any bulwark-backup
//! instance answers, also after the coordinator is gone. Without an id,
//! every recorded restore, newest first (`Backup.ListRestores`).

use std::time::SystemTime;

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::backup_client::BackupClient;
use serde::Serialize;

use super::{TimingRow, phase_name, status_name, step_line, step_name, timing_lines};
use crate::connect::Service;
use crate::error::CliError;
use crate::output::{self, OutputFormat};

/// A recorded restore, for people and scripts.
#[derive(Debug, Serialize)]
struct RestoreView {
    restore_id: String,
    state: String,
    coordinator: String,
    /// The phase it is in (running) or ended in.
    phase: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    /// When the coordinator last wrote the record: a running restore whose
    /// record stopped changing lost its coordinator.
    updated_at: Option<String>,
    /// From start to finish, or to the last update while running.
    took_seconds: Option<f64>,
    snapshot_id: String,
    revision: i64,
    cluster_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
    rolled_back: bool,
    timings: Vec<TimingRow>,
    nodes: Vec<NodeView>,
    /// How far a point-in-time build's replay is, while it runs.
    #[serde(skip_serializing_if = "String::is_empty")]
    progress: String,
}

#[derive(Debug, Serialize)]
struct NodeView {
    node: String,
    step: String,
    status: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    detail: String,
    at: Option<String>,
}

fn system_time(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| bulwark_api::time::timestamp_from_proto(t).ok())
}

fn rfc3339(t: Option<&prost_types::Timestamp>) -> Option<String> {
    system_time(t).map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn state_name(s: i32) -> String {
    output::enum_name(s, pb::RestoreState::as_str_name, "RESTORE_STATE_")
}

fn view(r: pb::RestoreRecord) -> RestoreView {
    let started = system_time(r.started_at.as_ref());
    let end = system_time(r.finished_at.as_ref().or(r.updated_at.as_ref()));
    RestoreView {
        took_seconds: started
            .zip(end)
            .and_then(|(s, e)| e.duration_since(s).ok())
            .map(|d| d.as_secs_f64()),
        started_at: rfc3339(r.started_at.as_ref()),
        finished_at: rfc3339(r.finished_at.as_ref()),
        updated_at: rfc3339(r.updated_at.as_ref()),
        state: state_name(r.state),
        phase: phase_name(r.phase),
        restore_id: r.restore_id,
        coordinator: r.coordinator,
        snapshot_id: r.snapshot_id,
        revision: r.revision,
        cluster_id: if r.cluster_id == 0 {
            String::new()
        } else {
            format!("{:x}", r.cluster_id)
        },
        error: r.error,
        rolled_back: r.rolled_back,
        progress: r.progress,
        timings: r.timings.into_iter().map(TimingRow::from).collect(),
        nodes: r
            .nodes
            .into_iter()
            .map(|n| NodeView {
                at: rfc3339(n.at.as_ref()),
                node: n.node_name,
                step: step_name(n.step),
                status: status_name(n.status),
                path: n.path,
                detail: n.detail,
            })
            .collect(),
    }
}

/// One restore, in full.
fn detail_text(v: &RestoreView) -> String {
    let or_dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let mut pairs = vec![
        ("restore", v.restore_id.clone()),
        ("state", v.state.clone()),
        ("phase", v.phase.clone()),
        ("coordinator", v.coordinator.clone()),
        ("started", or_dash(&v.started_at)),
        ("finished", or_dash(&v.finished_at)),
        ("updated", or_dash(&v.updated_at)),
        ("took", output::duration_text(v.took_seconds)),
        ("snapshot", v.snapshot_id.clone()),
        ("revision", v.revision.to_string()),
    ];
    if !v.progress.is_empty() {
        pairs.push(("progress", v.progress.clone()));
    }
    if !v.cluster_id.is_empty() {
        pairs.push(("cluster", v.cluster_id.clone()));
    }
    if v.state == "failed" {
        pairs.push(("rolled back", v.rolled_back.to_string()));
        pairs.push(("error", v.error.clone()));
    }
    let mut out = output::fields(&pairs);
    if !v.nodes.is_empty() {
        out.push_str("nodes:\n");
        for n in &v.nodes {
            out.push_str(&step_line(&n.node, &n.step, &n.status, &n.path, &n.detail));
            out.push('\n');
        }
    }
    if !v.timings.is_empty() {
        out.push_str("time taken:\n");
        out.push_str(&timing_lines(&v.timings));
    }
    out
}

/// Every restore, one line each.
fn list_text(views: &[RestoreView]) -> String {
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.restore_id.clone(),
                v.state.clone(),
                v.phase.clone(),
                v.started_at.clone().unwrap_or_else(|| "-".into()),
                output::duration_text(v.took_seconds),
                v.snapshot_id.clone(),
                v.revision.to_string(),
                v.coordinator.clone(),
            ]
        })
        .collect();
    output::table(
        &[
            "RESTORE",
            "STATE",
            "PHASE",
            "STARTED",
            "TOOK",
            "SNAPSHOT",
            "REVISION",
            "COORDINATOR",
        ],
        &rows,
    )
}

/// Runs `bulwarkctl restore status [ID]`.
pub async fn run(
    id: Option<&str>,
    service: &Service<'_>,
    format: OutputFormat,
) -> Result<(), CliError> {
    match id {
        Some(id) => {
            let req = pb::GetRestoreRequest {
                restore_id: id.to_owned(),
            };
            let r = service
                .send(BackupClient::new, req, |mut c, r| async move {
                    c.get_restore(r).await
                })
                .await?;
            output::print(format, &view(r), detail_text)
        }
        None => {
            let all = service
                .send(
                    BackupClient::new,
                    pb::ListRestoresRequest {},
                    |mut c, r| async move { c.list_restores(r).await },
                )
                .await?;
            let views: Vec<RestoreView> = all.restores.into_iter().map(view).collect();
            output::print(format, &views, |v| list_text(v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn record() -> pb::RestoreRecord {
        pb::RestoreRecord {
            restore_id: "20261205T100000Z-ab12".into(),
            coordinator: "node-0".into(),
            state: pb::RestoreState::Failed as i32,
            started_at: ts(1_800_000_000),
            finished_at: ts(1_800_000_012),
            updated_at: ts(1_800_000_012),
            phase: pb::RestorePhase::Preflight as i32,
            snapshot_id: "snap".into(),
            revision: 104,
            error: "pre-flight found 2 problem(s)".into(),
            rolled_back: true,
            timings: vec![pb::PhaseTiming {
                name: "plan".into(),
                node_name: String::new(),
                took: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 100_000_000,
                }),
            }],
            nodes: vec![pb::RestoreNodeProgress {
                node_name: "node-2".into(),
                step: pb::NodeStep::FetchSnapshot as i32,
                status: pb::StepStatus::Failed as i32,
                detail: "no room".into(),
                path: String::new(),
                at: ts(1_800_000_011),
            }],
            cluster_id: 0,
            progress: String::new(),
        }
    }

    /// While a restore runs: each node's bytes fetched (its last step's
    /// detail) and how far a point-in-time build's replay is.
    #[test]
    fn a_running_restore_shows_bytes_fetched_and_replay_progress() {
        let mut r = record();
        r.state = pb::RestoreState::Running as i32;
        r.phase = pb::RestorePhase::Build as i32;
        r.progress = "replayed to revision 5004 of 7006, 12000 events".into();
        r.nodes[0].status = pb::StepStatus::Running as i32;
        r.nodes[0].detail = "120.0 of 215.3 MiB stored fetched, 95.1 MiB/s".into();
        let text = detail_text(&view(r.clone()));
        assert!(
            text.lines().any(|l| l.starts_with("progress:")
                && l.ends_with(" replayed to revision 5004 of 7006, 12000 events")),
            "{text}"
        );
        assert!(
            text.contains(
                "  node-2 fetch_snapshot running (120.0 of 215.3 MiB stored fetched, 95.1 MiB/s)\n"
            ),
            "{text}"
        );
        r.progress.clear();
        assert!(!detail_text(&view(r)).contains("progress:"));
    }

    #[test]
    fn a_record_shows_state_phase_timings_and_nodes() {
        let v = view(record());
        assert_eq!(v.state, "failed");
        assert_eq!(v.phase, "preflight");
        assert_eq!(v.took_seconds, Some(12.0));
        assert_eq!(v.started_at.as_deref(), Some("2027-01-15T08:00:00Z"));
        let text = detail_text(&v);
        assert!(text.contains("state:       failed\n"), "{text}");
        assert!(text.contains("rolled back: true\n"), "{text}");
        assert!(
            text.contains("  node-2 fetch_snapshot failed (no room)\n"),
            "{text}"
        );
        assert!(text.contains("  plan "), "{text}");
        let json = output::render(OutputFormat::Json, &v, |_| String::new()).unwrap();
        assert!(json.contains("\"took_seconds\": 12.0"), "{json}");
        assert!(!json.contains("cluster_id\": \"0"), "{json}");
    }

    #[test]
    fn a_running_restore_counts_time_to_its_last_update() {
        let mut r = record();
        r.state = pb::RestoreState::Running as i32;
        r.finished_at = None;
        r.updated_at = ts(1_800_000_005);
        let v = view(r);
        assert_eq!(v.took_seconds, Some(5.0));
        assert!(!detail_text(&v).contains("rolled back"));
        let list = list_text(&[v]);
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines.len(), 2, "{list}");
        assert!(lines[0].starts_with("RESTORE"), "{list}");
        assert!(
            lines[1].contains("running") && lines[1].contains("preflight"),
            "{list}"
        );
    }
}
