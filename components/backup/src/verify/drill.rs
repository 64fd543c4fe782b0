//! A restore drill: the decoded snapshot restored with `etcdutl snapshot
//! restore` into a throwaway directory, an etcd started on it on loopback
//! ports, and its revision and key count compared with the manifest. The
//! directory and the process are removed whatever happens (the process is
//! killed on drop, the directory is a `TempDir`).

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::engine::DrillSettings;
use crate::etcd::EtcdConnector;
use crate::snapshot::manifest::{Manifest, Mismatch, MismatchKind};
use crate::verify::scratch::{Member, StartFailure, ToolFailure, tail};
use crate::verify::{Stage, VerifyEvent, VerifyProgress};

/// What the throwaway etcd showed.
pub(crate) struct DrillFindings {
    pub(crate) revision: i64,
    pub(crate) key_count: u64,
    pub(crate) mismatches: Vec<Mismatch>,
}

pub(crate) async fn run_drill(
    tools: &DrillSettings,
    dir: &Path,
    db: &Path,
    manifest: &Manifest,
    progress: &dyn VerifyProgress,
    cancel: &CancellationToken,
) -> std::result::Result<DrillFindings, Mismatch> {
    const ATTEMPTS: usize = 3;
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        match attempt_drill(tools, dir, db, attempt, progress, cancel).await {
            Ok((revision, key_count)) => return Ok(compare(manifest, revision, key_count)),
            Err(m) if m.detail.starts_with("port taken") && attempt < ATTEMPTS => {
                tracing::debug!(attempt, "drill port was taken; retrying");
                last = Some(m);
            }
            Err(m) => return Err(m),
        }
    }
    Err(last.unwrap_or_else(|| Mismatch::new(MismatchKind::EtcdUnhealthy, "no attempt ran")))
}

/// One attempt: restore, start, wait until the throwaway etcd answers;
/// its revision and key count.
async fn attempt_drill(
    tools: &DrillSettings,
    dir: &Path,
    db: &Path,
    attempt: usize,
    progress: &dyn VerifyProgress,
    cancel: &CancellationToken,
) -> std::result::Result<(i64, u64), Mismatch> {
    let stage = |stage, detail: String, since: Instant| {
        progress.event(VerifyEvent {
            stage,
            bytes_done: 0,
            bytes_total: 0,
            elapsed: since.elapsed(),
            detail,
        })
    };
    let unhealthy = |detail: String| Mismatch::new(MismatchKind::EtcdUnhealthy, detail);
    let since = Instant::now();
    let member =
        Member::new(dir, "drill", attempt).map_err(|e| unhealthy(format!("no free port: {e}")))?;
    stage(
        Stage::DrillRestore,
        format!(
            "etcdutl snapshot restore into {}",
            member.data_dir.display()
        ),
        since,
    );
    member.restore(tools, db).await.map_err(|e| {
        Mismatch::new(
            MismatchKind::RestoreFailed,
            match e {
                ToolFailure::Spawn(e) => format!("cannot run {}: {e}", tools.etcdutl.display()),
                ToolFailure::Exit(status, tail) => {
                    format!("etcdutl snapshot restore failed ({status}): {tail}")
                }
            },
        )
    })?;

    let since = Instant::now();
    stage(
        Stage::DrillStart,
        format!("throwaway etcd on {}", member.client),
        since,
    );
    let log_path = dir.join(format!("etcd-{attempt}.log"));
    let mut child = member
        .start(tools, &log_path, &[])
        .await
        .map_err(|e| match e {
            StartFailure::Log(what, e) => unhealthy(format!("{what}: {e}")),
            StartFailure::Spawn(e) => {
                unhealthy(format!("cannot start {}: {e}", tools.etcd.display()))
            }
        })?;
    let outcome = wait_answers(&mut child, &member.client, &log_path, tools, cancel).await;
    let _ = child.kill().await;
    let (revision, key_count) = outcome?;
    stage(
        Stage::DrillCompare,
        format!("revision {revision}, {key_count} keys"),
        since,
    );
    Ok((revision, key_count))
}

/// Polls the throwaway etcd until it answers with its revision and key
/// count, exits, or the start timeout passes.
async fn wait_answers(
    child: &mut tokio::process::Child,
    client: &str,
    log_path: &Path,
    tools: &DrillSettings,
    cancel: &CancellationToken,
) -> std::result::Result<(i64, u64), Mismatch> {
    let deadline = Instant::now() + tools.start_timeout;
    let connector = EtcdConnector::plain(vec![client.to_owned()], Duration::from_secs(2));
    loop {
        if cancel.is_cancelled() {
            return Err(Mismatch::new(
                MismatchKind::EtcdUnhealthy,
                "drill cancelled",
            ));
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log_path).unwrap_or_default();
            let in_use = text.contains("address already in use");
            return Err(Mismatch::new(
                MismatchKind::EtcdUnhealthy,
                format!(
                    "{}throwaway etcd exited ({status}): {}",
                    if in_use { "port taken; " } else { "" },
                    tail(&text)
                ),
            ));
        }
        if Instant::now() > deadline {
            return Err(Mismatch::new(
                MismatchKind::EtcdUnhealthy,
                format!(
                    "throwaway etcd not healthy after {}",
                    humantime::format_duration(tools.start_timeout)
                ),
            ));
        }
        if let Ok(mut c) = connector.client().await
            && let Ok((count, revision)) = EtcdConnector::key_count(&mut c, client, 0).await
        {
            return Ok((revision, count));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The throwaway etcd's revision and key count against the manifest.
fn compare(manifest: &Manifest, revision: i64, key_count: u64) -> DrillFindings {
    let mut mismatches = Vec::new();
    if revision < manifest.revision || revision > manifest.revision_max {
        mismatches.push(Mismatch::values(
            MismatchKind::Revision,
            if manifest.revision == manifest.revision_max {
                manifest.revision.to_string()
            } else {
                format!("{}..={}", manifest.revision, manifest.revision_max)
            },
            revision,
            "the restored etcd's revision is not the snapshot's",
        ));
    }
    if let Some(expected) = manifest.key_count
        && expected != key_count
    {
        mismatches.push(Mismatch::values(
            MismatchKind::KeyCount,
            expected,
            key_count,
            "the restored etcd has a different number of keys",
        ));
    }
    DrillFindings {
        revision,
        key_count,
        mismatches,
    }
}
