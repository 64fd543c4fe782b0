//! Point-in-time restore: building the one snapshot every member restores
//! from.
//!
//! ```text
//! plan ─▶ read + check every needed delta segment ─▶ download + check the base snapshot
//!      ─▶ (deltas to apply?) scratch etcd from the base ─▶ replay, one txn per revision
//!      ─▶ snapshot of the scratch etcd ─▶ target.db (+ its SHA-256)
//! ```
//!
//! Everything that can fail on bad data (a segment's hashes, decryption,
//! parse, revision continuity; the snapshot's hashes) fails before any
//! node is touched: the coordinator builds the target before it asks any
//! agent to stop etcd.
//!
//! Replay keeps etcd's revisions: every revision of the source history is
//! one transaction here (all events of a revision together), and each
//! transaction must land on exactly the revision it had in the source, so
//! the restored cluster's revisions, create revisions and versions match
//! the original's. Keys attached to a lease that the snapshot does not hold
//! get a lease with the same id and [`REPLAY_LEASE_TTL`]; the watch does not
//! carry TTLs, and owners (kube-apiserver) refresh or replace their leases.
//!
//! "To a time" means the last revision the delta recorder had received at
//! or before that time (events carry the time the recorder saw them).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use etcd_client::{LeaseGrantOptions, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use super::timeline::{Located, Timelines};
use crate::delta::{DeltaEvent, EventKind, SegmentMeta, check_continuity};
use crate::engine::Engine;
use crate::error::{BackupError, Corruption, Result};
use crate::pipeline::hashing::Sha256;
use crate::snapshot::manifest::Manifest;
use crate::snapshot::read::mismatch_error;
use crate::verify::scratch::ScratchEtcd;

/// TTL of the leases replay creates for keys whose lease the snapshot does
/// not hold.
pub const REPLAY_LEASE_TTL: i64 = 3600;

/// Which point in history to restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The snapshot as it is.
    Snapshot,
    /// Everything the snapshot's deltas cover.
    Latest,
    /// Exactly this revision.
    Revision(i64),
    /// The last revision received at or before this time.
    Time(DateTime<Utc>),
}

/// What a restore will use.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The base snapshot.
    pub base: Manifest,
    /// Segments to read, oldest first.
    pub segments: Vec<SegmentMeta>,
    /// The target.
    pub target: Target,
    /// The revision the target will have, when known before building
    /// (not for a time, nor for a bare snapshot whose revision is a range).
    pub target_revision: Option<i64>,
    /// Things the operator should know.
    pub warnings: Vec<String>,
    /// The timeline of the base snapshot, which the restore branches from.
    pub timeline: u32,
    /// The timeline the restore will start when it finishes.
    pub next_timeline: u32,
}

impl Plan {
    /// Whether deltas are replayed onto the base: only then is a target
    /// built; else every member restores the stored snapshot as it is.
    pub fn replays(&self) -> bool {
        self.target != Target::Snapshot && !self.segments.is_empty()
    }
}

/// Progress of building the target.
#[derive(Clone, Debug)]
pub enum BuildEvent {
    /// Downloading and checking the base snapshot.
    Download {
        /// Stored bytes read.
        bytes_done: u64,
        /// Stored bytes in total.
        bytes_total: u64,
        /// Since the download began.
        elapsed: Duration,
    },
    /// Replaying deltas: the scratch etcd has reached `revision`.
    Replay {
        /// Revision reached.
        revision: i64,
        /// Events applied so far.
        events: u64,
    },
}

/// The built target snapshot.
#[derive(Clone, Debug)]
pub struct BuiltTarget {
    /// The snapshot file (etcd's format, with its trailing hash).
    pub path: PathBuf,
    /// SHA-256 of the whole file.
    pub sha256: String,
    /// Its size.
    pub size: u64,
    /// Its revision, when known exactly (always after a replay).
    pub revision: Option<i64>,
    /// Segments whose events were applied.
    pub segments_applied: u32,
    /// Events applied.
    pub events_applied: u64,
}

impl Engine {
    /// Chooses the base snapshot and the delta segments for `target`.
    /// `snapshot`: an id, or `None` for the newest snapshot that can reach
    /// the target.
    pub async fn plan_restore(&self, snapshot: Option<&str>, target: Target) -> Result<Plan> {
        self.plan_restore_on(snapshot, target, None).await
    }

    /// [`Self::plan_restore`] in timeline `timeline`'s history (`None`: the
    /// current timeline): with the snapshot unset, the target is located
    /// along that history ([`Timelines::locate`]) and the base chosen among
    /// the snapshots of the timeline it lies in. A timeline with no
    /// snapshot of its own that reaches the target yields the state it
    /// began with (its parent at the branch revision).
    pub async fn plan_restore_on(
        &self,
        snapshot: Option<&str>,
        target: Target,
        timeline: Option<u32>,
    ) -> Result<Plan> {
        let all: Vec<Manifest> = self
            .list_snapshots()
            .await?
            .into_iter()
            .map(|e| e.manifest)
            .collect();
        let timelines = self.timelines_for(&all).await?;
        let (base, target, upper) = match snapshot {
            Some(id) => (
                self.explicit_base(&timelines, id, timeline).await?,
                target,
                None,
            ),
            None => {
                let n = timeline.unwrap_or_else(|| timelines.current());
                self.choose_base(&all, &timelines, n, target).await?
            }
        };
        let all = self.list_segments(Some(&base.id)).await?;
        let mut warnings = Vec::new();
        let (segments, target_revision) = segments_for(&base, all, target, &mut warnings)?;
        if let (Some(upper), Target::Time(t)) = (upper, target)
            && segments.last().is_some_and(|s| s.last_revision > upper)
        {
            return Err(BackupError::InvalidArgument(format!(
                "time {} falls after revision {upper}, where the asked timeline branched off \
                 timeline {}, and before that branch began: that stretch of timeline {} was \
                 abandoned. Restore --to-revision {upper} for the state the branch began \
                 with, or add --timeline {} for that timeline's own history",
                t.to_rfc3339(),
                timelines.of_manifest(&base),
                timelines.of_manifest(&base),
                timelines.of_manifest(&base),
            )));
        }
        Ok(Plan {
            timeline: timelines.of_manifest(&base),
            next_timeline: timelines.current() + 1,
            base,
            segments,
            target,
            target_revision,
            warnings,
        })
    }

    /// The snapshot the operator named, refused when it is not on the
    /// timeline they also named.
    async fn explicit_base(
        &self,
        timelines: &Timelines,
        id: &str,
        timeline: Option<u32>,
    ) -> Result<Manifest> {
        let m = self.get_snapshot(id).await?.manifest;
        let on = timelines.of_manifest(&m);
        match timeline {
            Some(n) if n != on => {
                timelines.get(n)?;
                Err(BackupError::InvalidArgument(format!(
                    "snapshot {id} is on timeline {on}, not timeline {n}: give the snapshot or \
                     the timeline, not both"
                )))
            }
            _ => Ok(m),
        }
    }

    /// The newest snapshot that can reach `target` in timeline `n`'s
    /// history, the target to build there, and the highest revision that
    /// timeline may contribute (when it is an ancestor of `n`).
    async fn choose_base(
        &self,
        all: &[Manifest],
        timelines: &Timelines,
        n: u32,
        target: Target,
    ) -> Result<(Manifest, Target, Option<i64>)> {
        let located = timelines.locate(n, target)?;
        // Nothing of n's own reaches a latest, snapshot or time target:
        // n then holds only the state it began with.
        let began_with = match (located.timeline == n, target) {
            (true, Target::Latest | Target::Time(_)) => timelines.start_of(n)?,
            (true, Target::Snapshot) => timelines.start_of(n)?.map(|l| Located {
                target: Target::Snapshot,
                ..l
            }),
            _ => None,
        };
        for l in std::iter::once(located).chain(began_with) {
            if let Some(m) = newest_fit(all, timelines, &l) {
                return Ok((m.clone(), l.target, l.upper));
            }
        }
        let here = timelines.get(located.timeline)?;
        if let Some(parent) = here.parent {
            return Err(BackupError::InvalidArgument(format!(
                "{} is not in timeline {n}'s history: timeline {} began at revision {} of \
                 timeline {parent} and none of its snapshots reaches it. Add --timeline \
                 {parent} to resolve it in that timeline's own history (`bulwarkctl backup \
                 list` shows each snapshot's timeline)",
                describe(target),
                here.number,
                here.branch_revision
            )));
        }
        let what = format!(
            "a snapshot at or before {} in timeline {n}'s history",
            describe(target)
        );
        Err(self.no_snapshot(&what).await)
    }

    /// Builds the target snapshot of `plan` in `dir`: reads and checks the
    /// segments, downloads and checks the base, replays what is needed.
    pub async fn build_target(
        &self,
        plan: &Plan,
        dir: &Path,
        progress: &(dyn Fn(BuildEvent) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<BuiltTarget> {
        // Segments first: they are small, and a bad one must stop the
        // restore before the long download.
        let mut events: Vec<DeltaEvent> = Vec::new();
        for s in &plan.segments {
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled("restore build".into()));
            }
            events.extend(self.read_segment(s).await?);
        }
        let entry = self.get_snapshot(&plan.base.id).await?;
        let base_db = dir.join("base.db");
        let since = Instant::now();
        let on_download = |bytes_done, bytes_total, _| {
            progress(BuildEvent::Download {
                bytes_done,
                bytes_total,
                elapsed: since.elapsed(),
            });
        };
        let mismatches = self
            .stream_check(&entry, Some(base_db.clone()), &on_download, cancel)
            .await?;
        if let Some(e) = mismatch_error(format!("snapshot {}", plan.base.id), &mismatches) {
            return Err(e);
        }
        progress(BuildEvent::Download {
            bytes_done: plan.base.stored_size_bytes,
            bytes_total: plan.base.stored_size_bytes,
            elapsed: since.elapsed(),
        });
        if events.is_empty() || !plan.replays() {
            // Nothing to replay: the base is the target.
            let (sha256, size) = file_sha256(&base_db).await?;
            return Ok(BuiltTarget {
                path: base_db,
                sha256,
                size,
                revision: plan.target_revision,
                segments_applied: 0,
                events_applied: 0,
            });
        }

        let scratch = ScratchEtcd::from_snapshot(&self.drill, dir, &base_db, cancel).await?;
        let result = replay(&scratch, plan, &events, progress, cancel).await;
        let built = match result {
            Ok((revision, applied)) => {
                let path = dir.join("target.db");
                let saved = scratch.save_snapshot(&path).await;
                scratch.stop().await;
                let (sha256, size) = saved?;
                let segments_applied = plan
                    .segments
                    .iter()
                    .filter(|s| applied > 0 && s.first_revision <= revision)
                    .count() as u32;
                BuiltTarget {
                    path,
                    sha256,
                    size,
                    revision: Some(revision),
                    segments_applied,
                    events_applied: applied,
                }
            }
            Err(e) => {
                scratch.stop().await;
                return Err(e);
            }
        };
        // The base is no longer needed; free the room before members stage.
        let _ = tokio::fs::remove_file(&base_db).await;
        Ok(built)
    }
}

/// The delta segments `target` needs on top of `base` (oldest first), and
/// the revision the target will have when it is known before building.
fn segments_for(
    base: &Manifest,
    all: Vec<SegmentMeta>,
    target: Target,
    warnings: &mut Vec<String>,
) -> Result<(Vec<SegmentMeta>, Option<i64>)> {
    Ok(match target {
        Target::Snapshot => (
            Vec::new(),
            (base.revision == base.revision_max).then_some(base.revision),
        ),
        Target::Latest => {
            let covered = check_continuity(base.revision, &all)?;
            if all.is_empty() {
                warnings.push(format!(
                    "snapshot {} has no delta segments: restoring the snapshot as it is",
                    base.id
                ));
            }
            let rev = if all.is_empty() {
                (base.revision == base.revision_max).then_some(base.revision)
            } else {
                Some(covered)
            };
            (all, rev)
        }
        Target::Revision(r) => {
            if r < base.revision {
                return Err(BackupError::InvalidArgument(format!(
                    "revision {r} is before snapshot {} (revision {}): choose an older \
                     snapshot or leave the snapshot unset",
                    base.id, base.revision
                )));
            }
            let needed: Vec<SegmentMeta> =
                all.into_iter().filter(|s| s.first_revision <= r).collect();
            let covered = check_continuity(base.revision, &needed)?.max(base.revision_max);
            if r > covered {
                return Err(BackupError::InvalidArgument(format!(
                    "revision {r} is not covered: snapshot {} and its deltas reach revision \
                     {covered}",
                    base.id
                )));
            }
            (needed, Some(r))
        }
        Target::Time(t) => {
            if t < base.started_at {
                return Err(BackupError::InvalidArgument(format!(
                    "time {} is before snapshot {} (taken at {}): choose an older snapshot \
                     or leave the snapshot unset",
                    t.to_rfc3339(),
                    base.id,
                    base.started_at.to_rfc3339()
                )));
            }
            let needed: Vec<SegmentMeta> =
                all.into_iter().filter(|s| s.first_event_at <= t).collect();
            check_continuity(base.revision, &needed)?;
            let newest = needed
                .last()
                .map(|s| s.last_event_at)
                .unwrap_or(base.started_at);
            if t > newest + chrono::TimeDelta::seconds(1) {
                warnings.push(format!(
                    "the newest recorded change is from {}; {} is later (nothing recorded \
                     in between, or the recorder was behind)",
                    newest.to_rfc3339(),
                    t.to_rfc3339()
                ));
            }
            (needed, None)
        }
    })
}

/// A target in the operator's words.
fn describe(target: Target) -> String {
    match target {
        Target::Snapshot => "a snapshot".to_owned(),
        Target::Latest => "the latest state".to_owned(),
        Target::Revision(r) => format!("revision {r}"),
        Target::Time(t) => format!("time {}", t.to_rfc3339()),
    }
}

/// The newest snapshot of `l.timeline` that can reach `l.target`, and that
/// is within the asked history (at or below `l.upper`).
fn newest_fit<'a>(all: &'a [Manifest], timelines: &Timelines, l: &Located) -> Option<&'a Manifest> {
    all.iter().find(|m| {
        timelines.of_manifest(m) == l.timeline
            && l.upper.is_none_or(|u| m.revision_max <= u)
            && match l.target {
                Target::Snapshot | Target::Latest => true,
                Target::Revision(r) => m.revision <= r,
                Target::Time(t) => m.started_at <= t,
            }
    })
}

/// Replays `events` into `scratch` up to the plan's target. Returns the
/// revision reached and the events applied.
async fn replay(
    scratch: &ScratchEtcd,
    plan: &Plan,
    events: &[DeltaEvent],
    progress: &(dyn Fn(BuildEvent) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(i64, u64)> {
    let mut client = scratch.client().await?;
    let eps = [scratch.endpoint().to_owned()];
    let mut current = crate::etcd::EtcdConnector::revision(&mut client, scratch.endpoint()).await?;
    if let Target::Revision(r) = plan.target
        && current > r
    {
        return Err(BackupError::InvalidArgument(format!(
            "snapshot {} holds revision {current}, past the requested {r} (its manifest could \
             only bracket it as {}..={}): choose an older snapshot",
            plan.base.id, plan.base.revision, plan.base.revision_max
        )));
    }
    let mut leases: BTreeSet<i64> = BTreeSet::new();
    let mut applied = 0u64;
    let mut last_report = Instant::now();
    let mut i = 0;
    while i < events.len() {
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled("restore build".into()));
        }
        let revision = events[i].revision;
        let mut j = i;
        while j < events.len() && events[j].revision == revision {
            j += 1;
        }
        let group = &events[i..j];
        i = j;
        // Overlapping segments (a resumed recorder) repeat revisions; the
        // snapshot may also already hold the first ones.
        if revision <= current {
            continue;
        }
        let stop = match plan.target {
            Target::Revision(r) => revision > r,
            Target::Time(t) => group.iter().any(|e| e.observed_at() > t),
            Target::Latest | Target::Snapshot => false,
        };
        if stop {
            break;
        }
        if revision != current + 1 {
            return Err(BackupError::Corrupt {
                kind: Corruption::DeltaGap,
                what: format!("deltas of snapshot {}", plan.base.id),
                detail: format!("revision {revision} follows {current}: revisions are missing"),
            });
        }
        let got = apply_revision(&mut client, &eps, group, &mut leases).await?;
        if got != revision {
            return Err(BackupError::Corrupt {
                kind: Corruption::DeltaContent,
                what: format!("deltas of snapshot {}", plan.base.id),
                detail: format!(
                    "replaying revision {revision} produced revision {got} (a recorded delete \
                     of a missing key, or a lease in the snapshot expired during the build)"
                ),
            });
        }
        current = revision;
        applied += group.len() as u64;
        if last_report.elapsed() >= Duration::from_millis(500) {
            last_report = Instant::now();
            progress(BuildEvent::Replay {
                revision,
                events: applied,
            });
        }
    }
    if let Target::Revision(r) = plan.target
        && current != r
    {
        return Err(BackupError::Corrupt {
            kind: Corruption::DeltaGap,
            what: format!("deltas of snapshot {}", plan.base.id),
            detail: format!("replay reached revision {current}, not the requested {r}"),
        });
    }
    progress(BuildEvent::Replay {
        revision: current,
        events: applied,
    });
    Ok((current, applied))
}

/// One revision's events as one transaction (their leases granted first);
/// the revision etcd answered with.
async fn apply_revision(
    client: &mut etcd_client::Client,
    eps: &[String],
    group: &[DeltaEvent],
    leases: &mut BTreeSet<i64>,
) -> Result<i64> {
    let mut ops = Vec::with_capacity(group.len());
    for e in group {
        match e.kind {
            EventKind::Put => {
                let mut opts = PutOptions::new();
                if e.lease != 0 {
                    if leases.insert(e.lease) {
                        ensure_lease(client, e.lease).await?;
                    }
                    opts = opts.with_lease(e.lease);
                }
                ops.push(TxnOp::put(e.key.clone(), e.value.clone(), Some(opts)));
            }
            EventKind::Delete => ops.push(TxnOp::delete(e.key.clone(), None)),
        }
    }
    let resp = client
        .txn(Txn::new().and_then(ops))
        .await
        .map_err(|e| crate::etcd::classify(eps, "replay txn", &e))?;
    Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
}

/// Grants lease `id` unless it exists.
async fn ensure_lease(client: &mut etcd_client::Client, id: i64) -> Result<()> {
    match client
        .lease_grant(REPLAY_LEASE_TTL, Some(LeaseGrantOptions::new().with_id(id)))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("lease already exists") => Ok(()),
        Err(e) => Err(BackupError::Etcd {
            operation: "lease grant",
            detail: crate::etcd::error_text(&e),
        }),
    }
}

/// SHA-256 and size of a file, read on a blocking thread.
pub async fn file_sha256(path: &Path) -> Result<(String, u64)> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut f = std::fs::File::open(&p)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(h.finish_hex());
            }
            h.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| BackupError::local("hashing task", e))?
    .map_err(|e: std::io::Error| BackupError::local(format!("reading {}", path.display()), e))
}
