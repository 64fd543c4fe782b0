//! `bulwarkctl backup …`: snapshots of etcd in object storage.
//!
//! `create` and `verify` show a progress bar on stderr (hidden when stderr
//! is not a terminal), so `-o json` on stdout stays machine-readable. A
//! verification that finds a problem exits 7 after printing what did not
//! match.

use std::time::{Duration, SystemTime};

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::backup_client::BackupClient;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::connect::Service;
use crate::error::{CliError, Exit};
use crate::output::{self, OutputFormat, size};

/// `bulwarkctl backup …`
#[derive(Debug, clap::Subcommand)]
pub enum BackupCommand {
    /// Take a snapshot now and wait for it to be committed.
    Create {
        /// Free text stored in the manifest (at most 256 characters).
        #[arg(long, default_value = "")]
        note: String,
        /// Snapshot this etcd member (by name) instead of the configured choice.
        #[arg(long)]
        member: Option<String>,
    },
    /// List committed snapshots, newest first.
    List {
        /// Only snapshots whose last verification passed.
        #[arg(long)]
        verified_only: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show one snapshot's manifest.
    Show {
        /// Snapshot id, or `latest`.
        id: String,
    },
    /// Check a snapshot end to end; with --drill also restore it into a
    /// throwaway etcd and compare revision and key count.
    Verify {
        /// Snapshot id, or `latest`.
        id: String,
        /// Also run a restore drill.
        #[arg(long)]
        drill: bool,
    },
    /// Delete a snapshot (operators only).
    Delete {
        /// Snapshot id, or `latest` (resolved to one id, printed, before
        /// anything is deleted).
        id: String,
        /// Needed to delete the newest, or newest verified, snapshot.
        #[arg(long)]
        force: bool,
    },
    /// Schedule, leader, last success and error, last drill and verify,
    /// delta coverage.
    Status,
    /// Continuous deltas: what a restore can reach (from the newest
    /// snapshot's revision to the newest committed event), the segments,
    /// the recorder's state and lag.
    Deltas {
        /// Also list every segment of the coverage.
        #[arg(long)]
        segments: bool,
    },
    /// Delete stored objects no committed record names (uploads without a
    /// manifest, delta data without a segment record, restore targets a
    /// crash left) once older than `retention.gcGracePeriod` (operators
    /// only). Retention does the same after every scheduled snapshot.
    Gc {
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

fn selector(id: &str) -> pb::SnapshotSelector {
    pb::SnapshotSelector {
        selector: Some(if id == "latest" {
            pb::snapshot_selector::Selector::Latest(true)
        } else {
            pb::snapshot_selector::Selector::Id(id.to_owned())
        }),
    }
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| bulwark_api::time::timestamp_from_proto(t).ok())
        .map(|t: SystemTime| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default()
}

fn stream_error(service: &Service<'_>, s: tonic::Status) -> CliError {
    CliError::from_status(&s, service.name(), "the stream")
}

/// One snapshot in list output.
#[derive(Debug, Serialize)]
struct Row {
    id: String,
    created: String,
    trigger: String,
    revision: i64,
    /// The history it belongs to (every restore starts a new one).
    timeline: u32,
    raw_bytes: u64,
    stored_bytes: u64,
    encrypted: bool,
    key_id: String,
    taken_by: String,
    last_verified: Option<Verified>,
}

/// A verification in list and show output.
#[derive(Debug, Serialize)]
struct Verified {
    at: String,
    passed: bool,
    drill: bool,
    mismatches: Vec<MismatchView>,
}

/// One failed check.
#[derive(Debug, Serialize)]
struct MismatchView {
    kind: String,
    expected: String,
    actual: String,
    detail: String,
}

fn mismatch(m: &pb::Mismatch) -> MismatchView {
    MismatchView {
        kind: pb::MismatchKind::try_from(m.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("MISMATCH_KIND_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|_| m.kind.to_string()),
        expected: m.expected.clone(),
        actual: m.actual.clone(),
        detail: m.detail.clone(),
    }
}

fn verified(v: Option<&pb::VerificationRecord>) -> Option<Verified> {
    v.map(|v| Verified {
        at: time(v.verified_at.as_ref()),
        passed: v.passed,
        drill: v.drill,
        mismatches: v.mismatches.iter().map(mismatch).collect(),
    })
}

fn trigger(t: i32) -> String {
    pb::SnapshotTrigger::try_from(t)
        .map(|t| {
            t.as_str_name()
                .trim_start_matches("SNAPSHOT_TRIGGER_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn verified_cell(v: &Option<Verified>) -> String {
    match v {
        None => "never".into(),
        Some(v) => format!(
            "{} {}{}",
            if v.passed { "passed" } else { "FAILED" },
            v.at,
            if v.drill { " (drill)" } else { "" }
        ),
    }
}

/// The manifest as `show` prints it.
#[derive(Debug, Serialize)]
struct ManifestView {
    id: String,
    trigger: String,
    cluster_name: String,
    cluster_id: String,
    member: String,
    etcd_version: String,
    revision: i64,
    revision_max: i64,
    timeline: u32,
    key_count: Option<u64>,
    raw_bytes: u64,
    stored_bytes: u64,
    etcd_sha256: String,
    stored_sha256: String,
    compression: String,
    encryption: String,
    key_id: String,
    object_key: String,
    started_at: String,
    finished_at: String,
    taken_by: String,
    note: String,
    last_verified: Option<Verified>,
}

fn manifest_view(m: &pb::SnapshotManifest) -> ManifestView {
    ManifestView {
        id: m.id.clone(),
        trigger: trigger(m.trigger),
        cluster_name: m.cluster_name.clone(),
        cluster_id: format!("{:016x}", m.cluster_id),
        member: format!("{} ({:016x})", m.member_name, m.member_id),
        etcd_version: m.etcd_version.clone(),
        revision: m.revision,
        revision_max: m.revision_max,
        timeline: m.timeline,
        key_count: m.key_count,
        raw_bytes: m.raw_size_bytes,
        stored_bytes: m.stored_size_bytes,
        etcd_sha256: m.etcd_sha256.clone(),
        stored_sha256: m.stored_sha256.clone(),
        compression: match pb::Compression::try_from(m.compression) {
            Ok(pb::Compression::Zstd) => format!("zstd level {}", m.compression_level),
            _ => "none".into(),
        },
        encryption: match pb::Encryption::try_from(m.encryption) {
            Ok(pb::Encryption::AgeX25519) => "age (X25519)".into(),
            _ => "none".into(),
        },
        key_id: m.key_id.clone(),
        object_key: m.object_key.clone(),
        started_at: time(m.started_at.as_ref()),
        finished_at: time(m.finished_at.as_ref()),
        taken_by: m.taken_by.clone(),
        note: m.note.clone(),
        last_verified: verified(m.last_verification.as_ref()),
    }
}

fn print_manifest(format: OutputFormat, m: &pb::SnapshotManifest) -> Result<(), CliError> {
    let view = manifest_view(m);
    output::print(format, &view, |v| {
        output::fields(&[
            ("id", v.id.clone()),
            ("trigger", v.trigger.clone()),
            (
                "cluster",
                format!("{} (etcd cluster {})", v.cluster_name, v.cluster_id),
            ),
            ("member", format!("{}, etcd {}", v.member, v.etcd_version)),
            (
                "revision",
                if v.revision == v.revision_max {
                    v.revision.to_string()
                } else {
                    format!("{}..{}", v.revision, v.revision_max)
                },
            ),
            ("timeline", v.timeline.to_string()),
            (
                "keys",
                v.key_count
                    .map(|k| k.to_string())
                    .unwrap_or_else(|| "unknown".into()),
            ),
            (
                "size",
                format!(
                    "{} from etcd, {} stored",
                    size(v.raw_bytes),
                    size(v.stored_bytes)
                ),
            ),
            ("etcd sha256", v.etcd_sha256.clone()),
            ("stored sha256", v.stored_sha256.clone()),
            ("compression", v.compression.clone()),
            (
                "encryption",
                if v.key_id.is_empty() {
                    v.encryption.clone()
                } else {
                    format!("{}, key {}", v.encryption, v.key_id)
                },
            ),
            ("object", v.object_key.clone()),
            (
                "taken",
                format!("{} .. {} by {}", v.started_at, v.finished_at, v.taken_by),
            ),
            ("note", v.note.clone()),
            ("last verified", verified_cell(&v.last_verified)),
        ])
    })
}

fn bar(len: Option<u64>) -> ProgressBar {
    let pb = match len {
        Some(n) if n > 0 => ProgressBar::new(n),
        _ => ProgressBar::no_length(),
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Runs one `backup` command against `service`.
pub async fn run(
    cmd: &BackupCommand,
    service: &Service<'_>,
    format: OutputFormat,
) -> Result<(), CliError> {
    match cmd {
        BackupCommand::Create { note, member } => {
            let req = pb::CreateSnapshotRequest {
                note: note.clone(),
                member_name: member.clone().unwrap_or_default(),
            };
            create(service, format, req).await
        }
        BackupCommand::List {
            verified_only,
            limit,
        } => {
            let req = pb::ListSnapshotsRequest {
                verified_only: *verified_only,
                page_size: *limit,
                ..Default::default()
            };
            list(service, format, req).await
        }
        BackupCommand::Show { id } => show(service, format, id).await,
        BackupCommand::Verify { id, drill } => verify(service, format, id, *drill).await,
        BackupCommand::Delete { id, force } => delete(service, format, id, *force).await,
        BackupCommand::Status => status(service, format).await,
        BackupCommand::Deltas { segments } => deltas(service, format, *segments).await,
        BackupCommand::Gc { dry_run } => gc(service, format, *dry_run).await,
    }
}

/// `backup create`: follows the snapshot's progress to its manifest.
async fn create(
    service: &Service<'_>,
    format: OutputFormat,
    req: pb::CreateSnapshotRequest,
) -> Result<(), CliError> {
    let stream = service
        .send(BackupClient::new, req, |mut c, r| async move {
            c.create_snapshot(r).await
        })
        .await?;
    let progress = bar(None);
    progress.set_message("connecting");
    let manifest = follow(service, stream, progress, "snapshot", |progress, msg| {
        match msg.event {
            Some(pb::snapshot_progress::Event::Connecting(c)) => progress.set_message(format!(
                "snapshot {} from {} (revision {})",
                msg.snapshot_id, c.member_name, c.revision
            )),
            Some(pb::snapshot_progress::Event::Streaming(s)) => {
                if let Some(total) = s.raw_bytes_expected {
                    progress.set_length(total.max(s.raw_bytes));
                }
                progress.set_position(s.raw_bytes);
            }
            Some(pb::snapshot_progress::Event::Committing(_)) => {
                progress.set_message("writing the manifest");
            }
            Some(pb::snapshot_progress::Event::Done(done)) => return Some(Ok(done.manifest)),
            Some(pb::snapshot_progress::Event::Failed(f)) => {
                let exit = if f.etcd_hash_mismatch {
                    Exit::VerifyFailed
                } else {
                    Exit::Failure
                };
                return Some(Err(CliError::new(
                    exit,
                    format!("snapshot {} failed: {}", msg.snapshot_id, f.message),
                )
                .hint("nothing was committed; the partial upload was removed")));
            }
            None => {}
        }
        None
    })
    .await?;
    let Some(m) = manifest else {
        return Err(CliError::new(Exit::Failure, "done without a manifest"));
    };
    print_manifest(format, &m)
}

/// Reads a progress stream, shown on `progress`, until `step` turns a
/// message into the outcome; the bar is cleared before that is returned,
/// so the caller prints on a clean terminal. A stream that ends without
/// an outcome is `Unavailable`, naming `what`.
async fn follow<M, T>(
    service: &Service<'_>,
    mut stream: tonic::Streaming<M>,
    progress: ProgressBar,
    what: &str,
    mut step: impl FnMut(&ProgressBar, M) -> Option<Result<T, CliError>>,
) -> Result<T, CliError> {
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| stream_error(service, s))?
    {
        if let Some(result) = step(&progress, msg) {
            progress.finish_and_clear();
            return result;
        }
    }
    progress.finish_and_clear();
    Err(CliError::new(
        Exit::Unavailable,
        format!("the {what} stream ended without a result"),
    ))
}

/// `backup list`.
async fn list(
    service: &Service<'_>,
    format: OutputFormat,
    req: pb::ListSnapshotsRequest,
) -> Result<(), CliError> {
    let resp = service
        .send(BackupClient::new, req, |mut c, r| async move {
            c.list_snapshots(r).await
        })
        .await?;
    let rows: Vec<Row> = resp
        .snapshots
        .iter()
        .map(|s| Row {
            id: s.id.clone(),
            created: time(s.created_at.as_ref()),
            trigger: trigger(s.trigger),
            revision: s.revision,
            timeline: s.timeline,
            raw_bytes: s.raw_size_bytes,
            stored_bytes: s.stored_size_bytes,
            encrypted: s.encrypted,
            key_id: s.key_id.clone(),
            taken_by: s.taken_by.clone(),
            last_verified: verified(s.last_verification.as_ref()),
        })
        .collect();
    output::print(format, &rows, |rows| render_list(rows))
}

/// `backup list` as a table.
fn render_list(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.created.clone(),
                r.trigger.clone(),
                r.revision.to_string(),
                r.timeline.to_string(),
                size(r.raw_bytes),
                size(r.stored_bytes),
                if r.encrypted {
                    "yes".into()
                } else {
                    "no".into()
                },
                r.taken_by.clone(),
                verified_cell(&r.last_verified),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "CREATED",
            "TRIGGER",
            "REVISION",
            "TIMELINE",
            "RAW",
            "STORED",
            "ENCRYPTED",
            "BY",
            "LAST VERIFIED",
        ],
        &cells,
    )
}

/// `backup show ID|latest`.
async fn show(service: &Service<'_>, format: OutputFormat, id: &str) -> Result<(), CliError> {
    print_manifest(format, &get_snapshot(service, id).await?)
}

/// `backup verify ID|latest [--drill]`: follows the check to its result.
async fn verify(
    service: &Service<'_>,
    format: OutputFormat,
    id: &str,
    drill: bool,
) -> Result<(), CliError> {
    let req = pb::VerifySnapshotRequest {
        snapshot: Some(selector(id)),
        drill,
    };
    let stream = service
        .send(BackupClient::new, req, |mut c, r| async move {
            c.verify_snapshot(r).await
        })
        .await?;
    let progress = bar(None);
    progress.set_message("downloading and checking");
    let result = follow(
        service,
        stream,
        progress,
        "verification",
        |progress, msg| match msg.event {
            Some(pb::verify_progress::Event::Stage(stage)) => {
                if let Some(t) = stage.transfer {
                    if let Some(total) = t.bytes_total {
                        progress.set_length(total);
                    }
                    progress.set_position(t.bytes_done);
                }
                if !stage.detail.is_empty() {
                    progress.set_message(stage.detail);
                }
                None
            }
            Some(pb::verify_progress::Event::Result(r)) => Some(Ok(r)),
            None => None,
        },
    )
    .await?;
    print_verify(format, &result)
}

/// `backup delete ID|latest [--force]`. `latest` becomes one concrete id
/// first, named on stderr, so the delete cannot hit a snapshot committed
/// in between; being the newest, it still needs `--force`.
async fn delete(
    service: &Service<'_>,
    format: OutputFormat,
    id: &str,
    force: bool,
) -> Result<(), CliError> {
    let id = if id == "latest" {
        let newest = get_snapshot(service, id).await?;
        output::note(&format!("latest is {}", newest.id));
        newest.id
    } else {
        id.to_owned()
    };
    let req = pb::DeleteSnapshotRequest { id, force };
    let resp = service
        .send(BackupClient::new, req, |mut c, r| async move {
            c.delete_snapshot(r).await
        })
        .await?;
    #[derive(Serialize)]
    struct Deleted {
        id: String,
        freed_bytes: u64,
    }
    output::print(
        format,
        &Deleted {
            id: resp.id,
            freed_bytes: resp.freed_bytes,
        },
        |d| format!("deleted {} ({} freed)\n", d.id, size(d.freed_bytes)),
    )
}

/// One unreferenced object in `backup gc` output.
#[derive(Debug, Serialize)]
struct GarbageRow {
    path: String,
    size_bytes: u64,
    last_modified: String,
    reason: String,
}

/// `backup gc` output.
#[derive(Debug, Serialize)]
struct GcView {
    dry_run: bool,
    grace_period_seconds: f64,
    collected: Vec<GarbageRow>,
    collected_bytes: u64,
    young: Vec<GarbageRow>,
    failed: Vec<GarbageRow>,
}

/// `backup gc [--dry-run]`.
async fn gc(service: &Service<'_>, format: OutputFormat, dry_run: bool) -> Result<(), CliError> {
    let req = pb::CollectGarbageRequest { dry_run };
    let resp = service
        .send(BackupClient::new, req, |mut c, r| async move {
            c.collect_garbage(r).await
        })
        .await?;
    let rows = |list: &[pb::GarbageObject]| -> Vec<GarbageRow> {
        list.iter()
            .map(|g| GarbageRow {
                path: g.path.clone(),
                size_bytes: g.size_bytes,
                last_modified: time(g.last_modified.as_ref()),
                reason: g.reason.clone(),
            })
            .collect()
    };
    let view = GcView {
        dry_run: resp.dry_run,
        grace_period_seconds: resp
            .grace_period
            .as_ref()
            .and_then(|d| bulwark_api::time::duration_from_proto(d).ok())
            .map_or(0.0, |d| d.as_secs_f64()),
        collected_bytes: resp.collected.iter().map(|g| g.size_bytes).sum(),
        collected: rows(&resp.collected),
        young: rows(&resp.young),
        failed: rows(&resp.failed),
    };
    output::print(format, &view, gc_text)?;
    if view.failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(
            Exit::Failure,
            format!(
                "{} object(s) could not be deleted; the store refused (see the backup logs)",
                view.failed.len()
            ),
        ))
    }
}

/// The text form of `backup gc`.
fn gc_text(v: &GcView) -> String {
    let verb = if v.dry_run { "would delete" } else { "deleted" };
    let grace = output::duration_text(Some(v.grace_period_seconds));
    let mut text = format!(
        "{verb} {} object(s), {} (older than the grace period, {grace})\n",
        v.collected.len(),
        size(v.collected_bytes)
    );
    let table = |list: &[GarbageRow]| {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|g| {
                vec![
                    g.path.clone(),
                    size(g.size_bytes),
                    g.last_modified.clone(),
                    g.reason.clone(),
                ]
            })
            .collect();
        output::table(&["OBJECT", "SIZE", "WRITTEN", "REASON"], &rows)
    };
    if !v.collected.is_empty() {
        text.push_str(&table(&v.collected));
    }
    if !v.young.is_empty() {
        text.push_str(&format!(
            "kept {} unreferenced object(s) younger than the grace period (an upload, segment or restore may still be writing them):\n",
            v.young.len()
        ));
        text.push_str(&table(&v.young));
    }
    if !v.failed.is_empty() {
        text.push_str("the store refused to delete:\n");
        text.push_str(&table(&v.failed));
    }
    text
}

/// `backup status`.
async fn status(service: &Service<'_>, format: OutputFormat) -> Result<(), CliError> {
    print_status(format, &get_status(service).await?)
}

/// The backup service's GetStatus, as `backup status`, `backup deltas`
/// and the `status` overview read it.
pub(crate) async fn get_status(service: &Service<'_>) -> Result<pb::GetStatusResponse, CliError> {
    service
        .send(
            BackupClient::new,
            pb::GetStatusRequest::default(),
            |mut c, r| async move { c.get_status(r).await },
        )
        .await
}

/// The manifest `id` (or `latest`) names.
async fn get_snapshot(service: &Service<'_>, id: &str) -> Result<pb::SnapshotManifest, CliError> {
    let req = pb::GetSnapshotRequest {
        snapshot: Some(selector(id)),
    };
    service
        .send(BackupClient::new, req, |mut c, r| async move {
            c.get_snapshot(r).await
        })
        .await
}

/// Verification result output.
#[derive(Debug, Serialize)]
struct VerifyView {
    snapshot_id: String,
    passed: bool,
    drill: bool,
    restored_revision: Option<i64>,
    restored_key_count: Option<u64>,
    took_seconds: f64,
    mismatches: Vec<MismatchView>,
}

fn print_verify(format: OutputFormat, r: &pb::VerifyResult) -> Result<(), CliError> {
    let view = VerifyView {
        snapshot_id: r.snapshot_id.clone(),
        passed: r.passed,
        drill: r.drill,
        restored_revision: r.restored_revision,
        restored_key_count: r.restored_key_count,
        took_seconds: r
            .took
            .as_ref()
            .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
            .unwrap_or(0.0),
        mismatches: r.mismatches.iter().map(mismatch).collect(),
    };
    output::print(format, &view, |v| {
        let mut text = output::fields(&[
            ("snapshot", v.snapshot_id.clone()),
            (
                "result",
                if v.passed {
                    "passed".into()
                } else {
                    "FAILED".into()
                },
            ),
            ("drill", if v.drill { "yes".into() } else { "no".into() }),
            (
                "restored",
                match (v.restored_revision, v.restored_key_count) {
                    (Some(r), Some(k)) => format!("revision {r}, {k} keys"),
                    _ => "-".into(),
                },
            ),
            ("took", format!("{:.1}s", v.took_seconds)),
        ]);
        if !v.mismatches.is_empty() {
            let cells: Vec<Vec<String>> = v
                .mismatches
                .iter()
                .map(|m| {
                    vec![
                        m.kind.clone(),
                        m.expected.clone(),
                        m.actual.clone(),
                        m.detail.clone(),
                    ]
                })
                .collect();
            text.push('\n');
            text.push_str(&output::table(
                &["MISMATCH", "EXPECTED", "ACTUAL", "DETAIL"],
                &cells,
            ));
        }
        text
    })?;
    if r.passed {
        Ok(())
    } else {
        Err(CliError::new(
            Exit::VerifyFailed,
            format!("snapshot {} failed verification", r.snapshot_id),
        ))
    }
}

/// Status output.
#[derive(Debug, Serialize)]
struct StatusView {
    node: String,
    store: String,
    schedule: String,
    next_run: String,
    leader: String,
    this_node_leads: bool,
    last_success: Option<String>,
    last_error: Option<String>,
    last_drill: Option<String>,
    last_verify: Option<String>,
    /// Newest revision a restore reaches (snapshot plus deltas; after a
    /// restore, from its restore point).
    covered_to_revision: i64,
    /// The current timeline (every restore starts a new one).
    timeline: u32,
    /// The delta recorder: `running`, `lagging`, `gap`, `stopped`, `disabled`.
    deltas: String,
    /// How much recent history etcd's loss would cost now.
    rpo_lag_seconds: Option<f64>,
    /// The restore this instance coordinates now: its phase and how long
    /// each finished phase and node step took.
    restore: Option<String>,
}

/// A running restore: `ID (coordinator N): PHASE for T; done: plan 0.1s, …`.
fn restore_line(r: &pb::RestoreInProgress, now: SystemTime) -> String {
    let secs = |d: Option<&prost_types::Duration>| {
        d.and_then(|d| bulwark_api::time::duration_from_proto(d).ok())
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let phase = pb::RestorePhase::try_from(r.phase)
        .map(|p| {
            p.as_str_name()
                .trim_start_matches("RESTORE_PHASE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into());
    let elapsed = r
        .phase_started_at
        .as_ref()
        .and_then(|t| bulwark_api::time::timestamp_from_proto(t).ok())
        .and_then(|t: SystemTime| now.duration_since(t).ok())
        .map(|d| format!(" for {:.1}s", d.as_secs_f64()))
        .unwrap_or_default();
    let done: Vec<String> = r
        .timings
        .iter()
        .map(|t| {
            let who = if t.node_name.is_empty() {
                t.name.clone()
            } else {
                format!("{} {}", t.node_name, t.name)
            };
            format!("{who} {:.1}s", secs(t.took.as_ref()))
        })
        .collect();
    format!(
        "{} (coordinator {}): {phase}{elapsed}{}",
        r.restore_id,
        r.coordinator,
        output::part("; done: ", &done.join(", "), "")
    )
}

/// The recorder's state as a word.
fn delta_state(d: Option<&pb::DeltaStatus>) -> String {
    match d.map(|d| d.state()) {
        None | Some(pb::DeltaState::Unspecified) => "unknown".into(),
        Some(st) => st
            .as_str_name()
            .trim_start_matches("DELTA_STATE_")
            .to_lowercase(),
    }
}

/// The RPO lag, when the recorder runs.
fn rpo_lag(d: Option<&pb::DeltaStatus>) -> Option<f64> {
    output::seconds(d.and_then(|d| d.rpo_lag.as_ref()))
}

/// `backup deltas` output.
#[derive(Debug, Serialize)]
struct DeltasView {
    /// The snapshot the deltas follow (the newest one).
    base_snapshot: Option<String>,
    /// The timeline (history) that snapshot and its deltas belong to: 1
    /// for the original cluster, one more after each restore and for each
    /// cluster rebuilt outside bulwark.
    timeline: Option<u32>,
    /// Coverage starts at the base snapshot's revision…
    from_revision: i64,
    from_time: String,
    /// …and reaches this revision.
    to_revision: i64,
    to_time: String,
    segment_count: usize,
    stored_bytes: u64,
    state: String,
    rpo_lag_seconds: Option<f64>,
    /// With `--segments`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    segments: Vec<SegmentRow>,
}

/// One delta segment.
#[derive(Debug, Serialize)]
struct SegmentRow {
    id: String,
    first_revision: i64,
    last_revision: i64,
    first_event: String,
    last_event: String,
    events: u64,
    stored_bytes: u64,
}

/// Every segment of the store, page by page (ListDeltas).
async fn all_segments(service: &Service<'_>) -> Result<Vec<pb::DeltaSegment>, CliError> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListDeltasRequest {
            page_token: page_token.clone(),
            ..Default::default()
        };
        let page = service
            .send(BackupClient::new, req, |mut c, r| async move {
                c.list_deltas(r).await
            })
            .await?;
        out.extend(page.segments);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

/// `backup deltas`: the coverage from GetStatus, its segments from
/// ListDeltas (those that follow the newest snapshot).
async fn deltas(service: &Service<'_>, format: OutputFormat, list: bool) -> Result<(), CliError> {
    let s = get_status(service).await?;
    // The status counts no segment when a restore abandoned the newest
    // snapshot's timeline; those are then not coverage either.
    let counted = s.deltas.as_ref().is_some_and(|d| d.segment_count > 0);
    let segments = match (&s.last_success, counted) {
        (Some(base), true) => {
            let prefix = format!("{}/", base.id);
            all_segments(service)
                .await?
                .into_iter()
                .filter(|g| g.id.starts_with(&prefix))
                .collect()
        }
        _ => Vec::new(),
    };
    print_deltas(format, &deltas_view(&s, &segments, list))
}

fn deltas_view(s: &pb::GetStatusResponse, segments: &[pb::DeltaSegment], list: bool) -> DeltasView {
    let base = s.last_success.as_ref();
    let last = segments.last();
    DeltasView {
        base_snapshot: base.map(|b| b.id.clone()),
        timeline: base.map(|b| b.timeline).filter(|t| *t > 0),
        from_revision: base.map_or(0, |b| b.revision),
        from_time: time(base.and_then(|b| b.created_at.as_ref())),
        to_revision: s.newest_revision_covered,
        to_time: match last {
            Some(l) => time(l.last_event_at.as_ref()),
            None => time(base.and_then(|b| b.created_at.as_ref())),
        },
        segment_count: segments.len(),
        stored_bytes: segments.iter().map(|g| g.stored_size_bytes).sum(),
        state: delta_state(s.deltas.as_ref()),
        rpo_lag_seconds: rpo_lag(s.deltas.as_ref()),
        segments: if list {
            segments
                .iter()
                .map(|g| SegmentRow {
                    id: g.id.clone(),
                    first_revision: g.first_revision,
                    last_revision: g.last_revision,
                    first_event: time(g.first_event_at.as_ref()),
                    last_event: time(g.last_event_at.as_ref()),
                    events: g.event_count,
                    stored_bytes: g.stored_size_bytes,
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

fn print_deltas(format: OutputFormat, v: &DeltasView) -> Result<(), CliError> {
    output::print(format, v, deltas_text)
}

/// The table form of `backup deltas`.
fn deltas_text(v: &DeltasView) -> String {
    {
        let mut out = output::fields(&[
            (
                "base snapshot",
                match (&v.base_snapshot, v.timeline) {
                    (Some(id), Some(t)) => format!("{id} (timeline {t})"),
                    (Some(id), None) => id.clone(),
                    (None, _) => "none".into(),
                },
            ),
            (
                "covered from",
                format!("revision {} at {}", v.from_revision, v.from_time),
            ),
            (
                "covered to",
                format!("revision {} at {}", v.to_revision, v.to_time),
            ),
            (
                "segments",
                format!("{} ({})", v.segment_count, size(v.stored_bytes)),
            ),
            (
                "deltas",
                match v.rpo_lag_seconds {
                    Some(lag) => {
                        format!("{}, rpo lag {}", v.state, output::duration_text(Some(lag)))
                    }
                    None => v.state.clone(),
                },
            ),
        ]);
        for g in &v.segments {
            out.push_str(&format!(
                "  {} revisions {}-{} {} events {} .. {} ({})\n",
                g.id,
                g.first_revision,
                g.last_revision,
                g.events,
                g.first_event,
                g.last_event,
                size(g.stored_bytes)
            ));
        }
        out
    }
}

/// One drill's or verification's outcome: `ID passed|FAILED at TIME`.
fn check_line(d: &pb::VerifyResult) -> String {
    format!(
        "{} {} at {}",
        d.snapshot_id,
        if d.passed { "passed" } else { "FAILED" },
        time(d.finished_at.as_ref())
    )
}

fn print_status(format: OutputFormat, s: &pb::GetStatusResponse) -> Result<(), CliError> {
    let sched = s.schedule.clone().unwrap_or_default();
    let view = StatusView {
        node: s.node_name.clone(),
        store: s.store_url.clone(),
        schedule: sched
            .interval
            .as_ref()
            .and_then(|d| bulwark_api::time::duration_from_proto(d).ok())
            .map(|d| format!("every {}", humantime::format_duration(d)))
            .unwrap_or_else(|| "cron or on demand".into()),
        next_run: time(sched.next_run_at.as_ref()),
        leader: sched.leader.clone(),
        this_node_leads: sched.is_leader,
        last_success: s
            .last_success
            .as_ref()
            .map(|l| format!("{} at {}", l.id, time(l.created_at.as_ref()))),
        last_error: s
            .last_error
            .as_ref()
            .map(|e| format!("{} ({}): {}", time(e.at.as_ref()), e.operation, e.message)),
        last_drill: s.last_drill.as_ref().map(check_line),
        last_verify: s.last_verify.as_ref().map(check_line),
        covered_to_revision: s.newest_revision_covered,
        timeline: s.timeline,
        deltas: delta_state(s.deltas.as_ref()),
        rpo_lag_seconds: rpo_lag(s.deltas.as_ref()),
        restore: s
            .restore_in_progress
            .as_ref()
            .map(|r| restore_line(r, SystemTime::now())),
    };
    output::print(format, &view, |v| {
        output::fields(&[
            ("node", v.node.clone()),
            ("store", v.store.clone()),
            ("schedule", v.schedule.clone()),
            ("next run", v.next_run.clone()),
            (
                "leader",
                format!(
                    "{}{}",
                    if v.leader.is_empty() {
                        "unknown"
                    } else {
                        &v.leader
                    },
                    if v.this_node_leads {
                        " (this node)"
                    } else {
                        ""
                    }
                ),
            ),
            (
                "last success",
                v.last_success.clone().unwrap_or_else(|| "none".into()),
            ),
            (
                "last error",
                v.last_error.clone().unwrap_or_else(|| "none".into()),
            ),
            (
                "last drill",
                v.last_drill.clone().unwrap_or_else(|| "none".into()),
            ),
            (
                "last verify",
                v.last_verify.clone().unwrap_or_else(|| "none".into()),
            ),
            (
                "covered to",
                format!(
                    "revision {} (timeline {})",
                    v.covered_to_revision, v.timeline
                ),
            ),
            (
                "restore",
                v.restore.clone().unwrap_or_else(|| "none running".into()),
            ),
            (
                "deltas",
                match v.rpo_lag_seconds {
                    Some(lag) => {
                        format!("{}, rpo lag {}", v.deltas, output::duration_text(Some(lag)))
                    }
                    None => v.deltas.clone(),
                },
            ),
        ])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_selectors() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert!(matches!(
            selector("latest").selector,
            Some(pb::snapshot_selector::Selector::Latest(true))
        ));
        assert!(matches!(
            selector("20250101T000000Z-r1-abcd").selector,
            Some(pb::snapshot_selector::Selector::Id(_))
        ));
    }

    #[test]
    fn failed_verification_exits_7_and_lists_mismatches() {
        let r = pb::VerifyResult {
            snapshot_id: "s".into(),
            passed: false,
            mismatches: vec![pb::Mismatch {
                kind: pb::MismatchKind::StoredHash as i32,
                expected: "aa".into(),
                actual: "bb".into(),
                detail: "d".into(),
            }],
            ..Default::default()
        };
        let e = print_verify(OutputFormat::Json, &r).unwrap_err();
        assert_eq!(e.exit(), Exit::VerifyFailed);
        assert_eq!(mismatch(&r.mismatches[0]).kind, "stored_hash");
    }

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn deltas_show_coverage_from_the_snapshot_to_the_newest_segment() {
        let status = pb::GetStatusResponse {
            last_success: Some(pb::SnapshotSummary {
                id: "snap".into(),
                revision: 100,
                created_at: ts(1_000),
                timeline: 2,
                ..Default::default()
            }),
            newest_revision_covered: 130,
            deltas: Some(pb::DeltaStatus {
                state: pb::DeltaState::Running as i32,
                rpo_lag: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 250_000_000,
                }),
                segment_count: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let seg = |first: i64, last: i64, at: i64| pb::DeltaSegment {
            id: format!("snap/{first}-{last}"),
            first_revision: first,
            last_revision: last,
            first_event_at: ts(at - 1),
            last_event_at: ts(at),
            event_count: (last - first + 1) as u64,
            stored_size_bytes: 1024,
            ..Default::default()
        };
        let segments = [seg(101, 120, 1_100), seg(121, 130, 1_200)];
        let v = deltas_view(&status, &segments, true);
        assert_eq!(v.base_snapshot.as_deref(), Some("snap"));
        assert_eq!((v.from_revision, v.to_revision), (100, 130));
        assert_eq!(v.to_time, "1970-01-01T00:20:00Z");
        assert_eq!((v.segment_count, v.stored_bytes), (2, 2048));
        assert_eq!(v.state, "running");
        assert_eq!(v.rpo_lag_seconds, Some(0.25));
        assert_eq!(v.segments.len(), 2);
        let text = deltas_text(&v);
        assert!(
            text.contains("base snapshot: snap (timeline 2)\n"),
            "{text}"
        );
        assert!(
            text.contains("covered from:  revision 100 at 1970-01-01T00:16:40Z\n"),
            "{text}"
        );
        assert!(
            text.contains("covered to:    revision 130 at 1970-01-01T00:20:00Z\n"),
            "{text}"
        );
        assert!(text.contains("segments:      2 (2.0 KiB)\n"), "{text}");
        assert!(
            text.contains("deltas:        running, rpo lag 250ms\n"),
            "{text}"
        );
        assert!(
            text.contains("  snap/121-130 revisions 121-130 10 events"),
            "{text}"
        );
        // Without --segments the JSON has no list.
        let v = deltas_view(&status, &segments, false);
        let json = output::render(OutputFormat::Json, &v, |_| String::new()).unwrap();
        assert!(!json.contains("\"segments\""), "{json}");
        assert!(json.contains("\"to_revision\": 130"), "{json}");
        assert!(json.contains("\"timeline\": 2"), "{json}");
    }

    #[test]
    fn status_keeps_verify_and_drill_apart_and_shows_coverage() {
        let check = |drill: bool, passed: bool| pb::VerifyResult {
            snapshot_id: if drill { "new" } else { "old" }.into(),
            passed,
            drill,
            finished_at: ts(0),
            ..Default::default()
        };
        let s = pb::GetStatusResponse {
            last_drill: Some(check(true, true)),
            last_verify: Some(check(false, false)),
            newest_revision_covered: 104,
            deltas: Some(pb::DeltaStatus {
                state: pb::DeltaState::Stopped as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            check_line(s.last_drill.as_ref().unwrap()),
            "new passed at 1970-01-01T00:00:00Z"
        );
        assert_eq!(
            check_line(s.last_verify.as_ref().unwrap()),
            "old FAILED at 1970-01-01T00:00:00Z"
        );
        assert_eq!(delta_state(s.deltas.as_ref()), "stopped");
        assert_eq!(rpo_lag(s.deltas.as_ref()), None);
        assert_eq!(delta_state(None), "unknown");
    }

    #[test]
    fn a_running_restore_shows_its_phase_and_what_each_step_took() {
        let r = pb::RestoreInProgress {
            restore_id: "r1".into(),
            coordinator: "node-1".into(),
            phase: pb::RestorePhase::RestoreMembers as i32,
            phase_started_at: ts(100),
            timings: vec![
                pb::PhaseTiming {
                    name: "plan".into(),
                    node_name: String::new(),
                    took: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 100_000_000,
                    }),
                },
                pb::PhaseTiming {
                    name: "fetch_snapshot".into(),
                    node_name: "node-0".into(),
                    took: Some(prost_types::Duration {
                        seconds: 12,
                        nanos: 0,
                    }),
                },
            ],
            ..Default::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(102_500);
        assert_eq!(
            restore_line(&r, now),
            "r1 (coordinator node-1): restore_members for 2.5s; done: plan 0.1s, node-0 fetch_snapshot 12.0s"
        );
    }
}
