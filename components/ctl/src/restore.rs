//! `bulwarkctl restore`: whole-cluster etcd restore from a snapshot, to the
//! snapshot itself, to the latest recorded state, to a revision or a time.
//!
//! Without `--yes` it asks on the terminal (and refuses when there is no
//! terminal to ask); `--dry-run` plans and checks everything, prepares
//! every node and changes nothing. Progress goes to stderr; the summary
//! (or where each node stands after a failure) to stdout, in the chosen
//! output format. Exit codes: 0 done, 6 not confirmed or refused by the
//! service, 7 the backup failed verification (nothing was touched), 1 any
//! other failure.
//!
//! `bulwarkctl restore status [ID]` (`status`) shows a restore's record;
//! `resume ID` and `rollback ID` finish one that stopped half-way.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::backup_client::BackupClient;
use serde::Serialize;

use crate::connect::Service;
use crate::error::{CliError, Exit};
use crate::output::{self, OutputFormat};

mod progress;
mod status;

use progress::Progress;

/// `bulwarkctl restore …`
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RestoreArgs {
    /// Instead of restoring: show what was recorded.
    #[command(subcommand)]
    pub action: Option<RestoreAction>,
    /// Base snapshot: an id, or `latest`.
    #[arg(long, default_value = "latest")]
    pub snapshot: String,
    /// Roll the snapshot forward with deltas to exactly this etcd revision.
    #[arg(
        long,
        conflicts_with_all = ["to_time", "to_latest"],
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i64).range(1..),
    )]
    pub to_revision: Option<i64>,
    /// Roll forward to the last change recorded at or before this time
    /// (RFC 3339, e.g. 2025-01-02T03:04:05Z).
    #[arg(long, conflicts_with = "to_latest", value_parser = parse_time)]
    pub to_time: Option<prost_types::Timestamp>,
    /// Roll forward through every recorded delta (the default when the
    /// snapshot is `latest` and no other target is given).
    #[arg(long)]
    pub to_latest: bool,
    /// Restore the snapshot as it is, without deltas.
    #[arg(long, conflicts_with_all = ["to_revision", "to_time", "to_latest"])]
    pub snapshot_only: bool,
    /// Resolve the target in this timeline's history (`backup list` and
    /// `backup status` show timelines; every restore starts a new one).
    /// Default: the current timeline. Going back to the history a restore
    /// abandoned: that history's number.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub timeline: Option<u32>,
    /// Plan and check everything, prepare every node, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Restore even where a node's data dir file system lacks room for the
    /// restored member (snapshot + two 64 MiB WAL segments + a margin);
    /// a node that then runs out of space makes every node roll back.
    #[arg(long)]
    pub skip_space_check: bool,
}

/// `bulwarkctl restore <action>`
#[derive(Debug, clap::Subcommand)]
pub enum RestoreAction {
    /// A restore's state, phase, each phase's and node step's time and
    /// each node's last step, as its coordinator recorded them in the store
    /// (any instance answers, also once the coordinator is gone). Without
    /// an id: every recorded restore, newest first.
    Status {
        /// The restore id `bulwarkctl restore` printed.
        id: Option<String>,
    },
    /// Finish a restore that stopped half-way (its coordinator died):
    /// when every node's member is restored, start them all and check the
    /// cluster; otherwise roll every node back. The instance asked
    /// coordinates. A restarted coordinator does this by itself.
    Resume {
        /// The restore id.
        id: String,
    },
    /// Roll every node of a restore that is not done back to its original
    /// data dir and manifest (the restored data is kept aside). Exits 0
    /// when every node is back.
    Rollback {
        /// The restore id.
        id: String,
    },
}

#[derive(Debug, Serialize)]
struct Summary {
    restore_id: String,
    dry_run: bool,
    snapshot_id: String,
    /// The revision restored to (before any bump).
    revision: i64,
    /// The cluster's revision when it was checked (bump and writes since).
    live_revision: i64,
    cluster_id: String,
    /// The timeline this restore started (0 for a dry run).
    timeline: u32,
    /// The timeline restored from.
    from_timeline: u32,
    deltas_applied: u32,
    took_seconds: Option<f64>,
    nodes: Vec<NodeRow>,
    /// Each phase's and each node's step's time, in order.
    timings: Vec<TimingRow>,
}

#[derive(Debug, Serialize)]
struct TimingRow {
    /// A phase, or a node's step.
    name: String,
    /// The node, for a step.
    #[serde(skip_serializing_if = "String::is_empty")]
    node: String,
    took_seconds: f64,
}

impl From<pb::PhaseTiming> for TimingRow {
    fn from(t: pb::PhaseTiming) -> Self {
        Self {
            name: t.name,
            node: t.node_name,
            took_seconds: output::seconds(t.took.as_ref()).unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Serialize)]
struct NodeRow {
    node: String,
    member: String,
    member_id: String,
    old_data_dir_kept_at: String,
}

#[derive(Debug, Serialize)]
struct FailureReport {
    restore_id: String,
    phase: String,
    message: String,
    rolled_back: bool,
    instructions: String,
    nodes: Vec<NodeState>,
}

#[derive(Debug, Serialize)]
struct NodeState {
    node: String,
    last_step: String,
    manifest_in_place: bool,
    data_dir_moved: bool,
    data_dir_aside: String,
    restored: bool,
    error: String,
    manual_rollback: Vec<String>,
}

fn enum_name(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_lowercase()
}

fn phase_name(p: i32) -> String {
    pb::RestorePhase::try_from(p)
        .map(|p| enum_name(p.as_str_name(), "RESTORE_PHASE_"))
        .unwrap_or_else(|_| p.to_string())
}

fn step_name(s: i32) -> String {
    pb::NodeStep::try_from(s)
        .map(|s| enum_name(s.as_str_name(), "NODE_STEP_"))
        .unwrap_or_else(|_| s.to_string())
}

fn status_name(s: i32) -> String {
    pb::StepStatus::try_from(s)
        .map(|s| enum_name(s.as_str_name(), "STEP_STATUS_"))
        .unwrap_or_else(|_| s.to_string())
}

impl RestoreArgs {
    fn request(&self) -> pb::RestoreRequest {
        let snapshot = pb::SnapshotSelector {
            selector: Some(if self.snapshot == "latest" {
                pb::snapshot_selector::Selector::Latest(true)
            } else {
                pb::snapshot_selector::Selector::Id(self.snapshot.clone())
            }),
        };
        let target = if let Some(r) = self.to_revision {
            Some(pb::restore_target::Target::Revision(r))
        } else if let Some(at) = self.to_time {
            Some(pb::restore_target::Target::Time(at))
        } else if self.snapshot_only {
            None
        } else if self.to_latest || self.snapshot == "latest" {
            Some(pb::restore_target::Target::Latest(true))
        } else {
            None
        };
        pb::RestoreRequest {
            snapshot: Some(snapshot),
            target: target.map(|t| pb::RestoreTarget { target: Some(t) }),
            dry_run: self.dry_run,
            confirm: !self.dry_run,
            skip_space_check: self.skip_space_check,
            timeline: self.timeline,
            ..Default::default()
        }
    }

    fn confirm(&self) -> Result<(), CliError> {
        if self.yes || self.dry_run {
            return Ok(());
        }
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Err(CliError::new(
                Exit::Refused,
                "a restore stops etcd on every control-plane node and replaces its data: \
                 pass --yes to confirm (or --dry-run to see the plan)",
            ));
        }
        eprint!(
            "This stops etcd on every control-plane node and replaces its data with snapshot {} \
             (old data dirs are kept). Type 'yes' to continue: ",
            self.snapshot
        );
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| CliError::new(Exit::Failure, format!("reading the answer: {e}")))?;
        if line.trim() == "yes" {
            Ok(())
        } else {
            Err(CliError::new(
                Exit::Refused,
                "not confirmed; nothing was changed",
            ))
        }
    }
}

/// Runs `bulwarkctl restore` and its `status`, `resume` and `rollback`.
pub async fn run(
    args: &RestoreArgs,
    service: &Service<'_>,
    format: OutputFormat,
) -> Result<(), CliError> {
    match &args.action {
        Some(RestoreAction::Status { id }) => {
            return status::run(id.as_deref(), service, format).await;
        }
        Some(RestoreAction::Resume { id }) => {
            let req = pb::ResumeRestoreRequest {
                restore_id: id.clone(),
            };
            let stream = service
                .send(BackupClient::new, req, |mut c, r| async move {
                    c.resume_restore(r).await
                })
                .await?;
            return follow(stream, service, format, false).await;
        }
        Some(RestoreAction::Rollback { id }) => {
            let req = pb::RollbackRestoreRequest {
                restore_id: id.clone(),
            };
            let stream = service
                .send(BackupClient::new, req, |mut c, r| async move {
                    c.rollback_restore(r).await
                })
                .await?;
            return follow(stream, service, format, true).await;
        }
        None => {}
    }
    let req = args.request();
    args.confirm()?;
    let stream = service
        .send(BackupClient::new, req, |mut c, r| async move {
            c.restore(r).await
        })
        .await?;
    follow(stream, service, format, false).await
}

/// `--to-time`'s parser: checked with the other flags, before anything is
/// asked of a service.
fn parse_time(t: &str) -> Result<prost_types::Timestamp, String> {
    let at = humantime::parse_rfc3339_weak(t)
        .map_err(|e| format!("{e} (expected RFC 3339, e.g. 2025-01-02T03:04:05Z)"))?;
    bulwark_api::time::timestamp_to_proto(at).map_err(|e| e.to_string())
}

/// Follows a restore's progress (plan, phases, node steps) to its summary
/// or its failure report. With `rollback_wanted` (`restore rollback`), a
/// failure report whose nodes are all back is the success asked for.
async fn follow(
    mut stream: tonic::Streaming<pb::RestoreProgress>,
    service: &Service<'_>,
    format: OutputFormat,
    rollback_wanted: bool,
) -> Result<(), CliError> {
    let mut bar = Progress::new();
    let mut target = TargetLine::default();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| CliError::from_status(&s, service.name(), "the restore stream"))?
    {
        let restore_id = msg.restore_id.clone();
        match msg.event {
            Some(pb::restore_progress::Event::Plan(p)) => {
                target.undecided = p.target_revision == 0;
                say_plan(&bar, &restore_id, &p);
            }
            Some(pb::restore_progress::Event::Phase(p)) => {
                if let Some(line) = target.on_phase(&p) {
                    bar.say(line);
                }
                bar.phase(&p);
            }
            Some(pb::restore_progress::Event::Node(n)) => bar.node(&n),
            Some(pb::restore_progress::Event::Done(s)) => {
                bar.finish();
                return print_summary(&summary(restore_id, s), format);
            }
            Some(pb::restore_progress::Event::Failed(f)) => {
                bar.finish();
                let exit = failure_exit(&f);
                let message = f.message.clone();
                let report = failure_report(restore_id, f);
                print_failure(&report, format)?;
                if rollback_wanted && report.rolled_back {
                    return Ok(());
                }
                // The message is said once, here (the report above has
                // the nodes and what to do).
                return Err(CliError::new(
                    exit,
                    format!(
                        "restore {} failed in phase {}: {message}",
                        report.restore_id, report.phase
                    ),
                ));
            }
            None => {}
        }
    }
    Err(CliError::new(
        Exit::Failure,
        "the restore stream ended without a result; check `bulwarkctl backup status` and the nodes",
    ))
}

/// A target revision chosen while replaying (`--to-time`, `--to-latest`)
/// is known once the build phase ends: it gets a line of its own, not only
/// the spinner (hidden without a terminal).
#[derive(Default)]
struct TargetLine {
    undecided: bool,
    last_built: Option<i64>,
}

impl TargetLine {
    /// The line to print, once, when the phase after the build begins.
    fn on_phase(&mut self, p: &pb::RestorePhaseProgress) -> Option<String> {
        if !self.undecided {
            return None;
        }
        if p.phase == pb::RestorePhase::Build as i32 {
            self.last_built = p.revision.or(self.last_built);
            return None;
        }
        let r = self.last_built.take()?;
        self.undecided = false;
        Some(format!("target revision {r} (chosen while replaying)"))
    }
}

/// The plan, as lines above the spinner: what is restored to where.
fn say_plan(bar: &Progress, restore_id: &str, p: &pb::RestorePlan) {
    let snap = p.snapshot.as_ref();
    bar.say(format!(
            "restore {restore_id}{}: snapshot {} (revision {}), {} delta segment(s), target revision {}, {} node(s)",
            if p.dry_run { " (dry run)" } else { "" },
            snap.map(|s| s.id.as_str()).unwrap_or("?"),
            snap.map(|s| s.revision).unwrap_or(0),
            p.deltas.len(),
            if p.target_revision > 0 {
                p.target_revision.to_string()
            } else {
                "decided while replaying".into()
            },
            p.nodes.len(),
        ),
    );
    for n in &p.nodes {
        if let Some(i) = &n.info {
            bar.say(format!(
                "  {} member {} data {} -> kept at {}",
                i.node_name, i.member_name, i.data_dir, n.data_dir_aside_path
            ));
        }
    }
    for w in &p.warnings {
        bar.say(format!("  warning: {w}"));
    }
}

/// The spinner's message for a phase: its name, bytes moved, revision.
fn phase_message(p: &pb::RestorePhaseProgress) -> String {
    let mut m = phase_name(p.phase);
    if let Some(t) = &p.transfer {
        m.push_str(&format!(
            " {}/{} bytes",
            t.bytes_done,
            t.bytes_total.unwrap_or(0)
        ));
    }
    if let Some(r) = p.revision {
        m.push_str(&format!(" revision {r}"));
    }
    m
}

/// One node's step: `  node step status path (detail)`.
fn node_line(n: &pb::NodeRestoreProgress) -> String {
    step_line(
        &n.node_name,
        &step_name(n.step),
        &status_name(n.status),
        &n.path,
        &n.detail,
    )
}

/// `  node step status path (detail)`, the path and the detail when
/// given: as the progress and `restore status` show a node's step.
fn step_line(node: &str, step: &str, status: &str, path: &str, detail: &str) -> String {
    format!(
        "  {node} {step} {status}{}{}",
        output::part(" ", path, ""),
        output::part(" (", detail, ")"),
    )
}

fn summary(restore_id: String, s: pb::RestoreSummary) -> Summary {
    Summary {
        restore_id,
        dry_run: s.dry_run,
        snapshot_id: s.snapshot_id,
        revision: s.revision,
        live_revision: s.live_revision,
        cluster_id: format!("{:x}", s.cluster_id),
        timeline: s.timeline,
        from_timeline: s.from_timeline,
        deltas_applied: s.deltas_applied,
        took_seconds: output::seconds(s.took.as_ref()),
        nodes: s
            .nodes
            .into_iter()
            .map(|n| NodeRow {
                node: n.node_name,
                member: n.member_name,
                member_id: format!("{:x}", n.member_id),
                old_data_dir_kept_at: n.data_dir_aside_path,
            })
            .collect(),
        timings: s.timings.into_iter().map(TimingRow::from).collect(),
    }
}

/// The timing lines: each phase, with its nodes' steps under it.
fn timing_lines(rows: &[TimingRow]) -> String {
    let mut out = String::new();
    for t in rows {
        let what = if t.node.is_empty() {
            t.name.clone()
        } else {
            format!("  {} {}", t.node, t.name)
        };
        out.push_str(&format!("  {what:<36} {:>8.2}s\n", t.took_seconds));
    }
    out
}

fn failure_report(restore_id: String, f: pb::RestoreFailure) -> FailureReport {
    FailureReport {
        restore_id,
        phase: phase_name(f.phase),
        message: f.message,
        rolled_back: f.rolled_back,
        instructions: f.rollback_instructions,
        nodes: f
            .nodes
            .into_iter()
            .map(|n| NodeState {
                node: n.node_name,
                last_step: step_name(n.last_step),
                manifest_in_place: n.manifest_in_place,
                data_dir_moved: n.data_dir_moved,
                data_dir_aside: n.data_dir_aside_path,
                restored: n.restored,
                error: n.error,
                manual_rollback: n.manual_rollback,
            })
            .collect(),
    }
}

fn print_summary(s: &Summary, format: OutputFormat) -> Result<(), CliError> {
    output::print(format, s, |s| {
        let mut out = format!(
            "{} {}: snapshot {}, {} delta segment(s), revision {}{}, cluster {}, took {}\n",
            if s.dry_run { "dry run" } else { "restored" },
            s.restore_id,
            s.snapshot_id,
            s.deltas_applied,
            s.revision,
            if s.live_revision > s.revision {
                format!(" (live revision {})", s.live_revision)
            } else {
                String::new()
            },
            s.cluster_id,
            output::duration_text(s.took_seconds)
        );
        if s.timeline > 0 {
            out.push_str(&format!(
                "  timeline {} begins here, branched from timeline {} at revision {}\n",
                s.timeline, s.from_timeline, s.revision
            ));
        } else if s.from_timeline > 0 {
            out.push_str(&format!("  from timeline {}\n", s.from_timeline));
        }
        for n in &s.nodes {
            out.push_str(&format!(
                "  {} member {} ({}), old data dir kept at {}\n",
                n.node, n.member, n.member_id, n.old_data_dir_kept_at
            ));
        }
        if !s.timings.is_empty() {
            out.push_str("time taken:\n");
            out.push_str(&timing_lines(&s.timings));
        }
        out
    })
}

/// The exit code of a failed restore, as docs/OPERATIONS.md documents
/// them: the cause's status code when the request was at fault (2 for a
/// target that is not covered, 5 for an unknown snapshot, 6 refused), 7
/// for a snapshot or segment that fails its checks, else 1.
fn failure_exit(f: &pb::RestoreFailure) -> Exit {
    if f.code != 0 {
        let status = tonic::Status::new(tonic::Code::from(f.code), f.message.clone());
        return CliError::from_status(&status, "bulwark-backup", "").exit();
    }
    if f.phase == pb::RestorePhase::Download as i32 {
        Exit::VerifyFailed
    } else {
        Exit::Failure
    }
}

/// The report without the message (the error line that follows carries
/// it): what to do, then where each node stands.
fn print_failure(r: &FailureReport, format: OutputFormat) -> Result<(), CliError> {
    output::print(format, r, |r| {
        let mut out = format!("{}\n", r.instructions);
        for n in &r.nodes {
            out.push_str(&format!(
                "  {}: last step {}, manifest in place {}, data dir moved {}{}, restored {}{}\n",
                n.node,
                n.last_step,
                n.manifest_in_place,
                n.data_dir_moved,
                output::part(" (", &n.data_dir_aside, ")"),
                n.restored,
                output::part(", error: ", &n.error, ""),
            ));
            for c in &n.manual_rollback {
                out.push_str(&format!("    {c}\n"));
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(p: pb::RestorePhase, revision: Option<i64>) -> pb::RestorePhaseProgress {
        pb::RestorePhaseProgress {
            phase: p as i32,
            transfer: None,
            revision,
        }
    }

    /// `--to-time`: the revision chosen while replaying gets one plain
    /// line when the build ends; a plan that named it gets none.
    #[test]
    fn a_target_chosen_while_replaying_gets_a_line() {
        let mut t = TargetLine {
            undecided: true,
            last_built: None,
        };
        assert_eq!(t.on_phase(&phase(pb::RestorePhase::Download, None)), None);
        assert_eq!(t.on_phase(&phase(pb::RestorePhase::Build, Some(120))), None);
        assert_eq!(t.on_phase(&phase(pb::RestorePhase::Build, Some(131))), None);
        assert_eq!(
            t.on_phase(&phase(pb::RestorePhase::Upload, None))
                .as_deref(),
            Some("target revision 131 (chosen while replaying)")
        );
        assert_eq!(t.on_phase(&phase(pb::RestorePhase::Prepare, None)), None);

        let mut named = TargetLine::default();
        assert_eq!(
            named.on_phase(&phase(pb::RestorePhase::Build, Some(5004))),
            None
        );
        assert_eq!(named.on_phase(&phase(pb::RestorePhase::Upload, None)), None);
    }

    #[test]
    fn failures_exit_as_documented() {
        let failure = |code: tonic::Code, phase: pb::RestorePhase| pb::RestoreFailure {
            phase: phase as i32,
            code: if code == tonic::Code::Ok {
                0
            } else {
                code as i32
            },
            message: "x".into(),
            ..Default::default()
        };
        use pb::RestorePhase::*;
        for (code, phase, exit) in [
            (tonic::Code::InvalidArgument, Plan, 2),
            (tonic::Code::NotFound, Plan, 5),
            (tonic::Code::FailedPrecondition, Plan, 6),
            (tonic::Code::Ok, Download, 7),
            (tonic::Code::Ok, StartMembers, 1),
        ] {
            assert_eq!(
                failure_exit(&failure(code, phase)).code(),
                exit,
                "{code:?} {phase:?}"
            );
        }
    }

    fn parse(args: &[&str]) -> Result<RestoreArgs, clap::Error> {
        use clap::Parser as _;
        let cli =
            crate::cli::Cli::try_parse_from(["bulwarkctl", "restore"].iter().chain(args).copied())?;
        match cli.command {
            crate::cli::Command::Restore(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn status_resume_and_rollback_are_subcommands_of_restore() {
        assert!(matches!(
            parse(&["status"]).unwrap().action,
            Some(RestoreAction::Status { id: None })
        ));
        assert!(matches!(
            parse(&["status", "r1"]).unwrap().action,
            Some(RestoreAction::Status { id: Some(ref id) }) if id == "r1"
        ));
        assert!(matches!(
            parse(&["resume", "r1"]).unwrap().action,
            Some(RestoreAction::Resume { ref id }) if id == "r1"
        ));
        assert!(matches!(
            parse(&["rollback", "r1"]).unwrap().action,
            Some(RestoreAction::Rollback { ref id }) if id == "r1"
        ));
        assert!(parse(&["resume"]).is_err(), "resume needs an id");
        // Restore flags and a subcommand do not mix.
        assert!(parse(&["--yes", "status"]).is_err());
        let plain = parse(&["--snapshot", "s1", "--yes"]).unwrap();
        assert!(plain.action.is_none() && plain.yes && plain.snapshot == "s1");
    }

    /// A target that cannot be is refused with the other flags, before the
    /// context is read or a service asked.
    #[test]
    fn bad_targets_are_refused_when_the_flags_are_parsed() {
        for (args, expected) in [
            (&["--to-revision", "0"][..], "0 is not in 1.."),
            (&["--to-revision", "-5"], "-5 is not in 1.."),
            (&["--to-time", "yesterday"], "expected RFC 3339"),
            (&["--to-time", "2025-13-01T00:00:00Z"], "expected RFC 3339"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(expected), "{args:?}: {e}");
        }
        let at = parse(&["--to-time", "2025-01-02T03:04:05Z"]).unwrap();
        let target = at.request().target.unwrap().target.unwrap();
        let pb::restore_target::Target::Time(t) = target else {
            panic!("{target:?}");
        };
        assert_eq!(t.seconds, 1_735_787_045);
        let at = parse(&["--to-revision", "42"]).unwrap();
        assert_eq!(
            at.request().target.unwrap().target,
            Some(pb::restore_target::Target::Revision(42))
        );
    }

    /// The summary's revision is the one restored; the live one is beside it.
    #[test]
    fn the_summary_reports_the_restored_revision() {
        let s = summary(
            "r1".into(),
            pb::RestoreSummary {
                revision: 5004,
                live_revision: 1_000_005_005,
                snapshot_id: "snap".into(),
                ..Default::default()
            },
        );
        assert_eq!(s.revision, 5004);
        assert!(s.timings.is_empty());
        let json = output::render(OutputFormat::Json, &s, |_| String::new()).unwrap();
        assert!(json.contains("\"revision\": 5004"), "{json}");
        assert!(json.contains("\"live_revision\": 1000005005"), "{json}");
    }

    #[test]
    fn every_phase_and_step_is_shown_with_its_time() {
        let t = |name: &str, node: &str, ms: i32| pb::PhaseTiming {
            name: name.into(),
            node_name: node.into(),
            took: Some(prost_types::Duration {
                seconds: 0,
                nanos: ms * 1_000_000,
            }),
        };
        let s = summary(
            "r1".into(),
            pb::RestoreSummary {
                timings: vec![
                    t("plan", "", 100),
                    t("fetch_snapshot", "node-0", 250),
                    t("prepare", "", 300),
                    t("check", "", 50),
                ],
                ..Default::default()
            },
        );
        assert_eq!(s.timings[1].node, "node-0");
        assert!((s.timings[1].took_seconds - 0.25).abs() < 1e-9);
        let text = timing_lines(&s.timings);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("  plan ") && lines[0].ends_with("0.10s"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("    node-0 fetch_snapshot") && lines[1].ends_with("0.25s"),
            "{text}"
        );
        let json = output::render(OutputFormat::Json, &s, |_| String::new()).unwrap();
        assert!(json.contains("\"name\": \"check\""), "{json}");
    }
}
