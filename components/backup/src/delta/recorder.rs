//! The recorder: follows etcd after each base snapshot, buffers events,
//! flushes segments and reports gaps.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_common::workers::Worker;
use chrono::Utc;
use etcd_client::{EventType, WatchOptions};
use tokio_util::sync::CancellationToken;

use crate::delta::format::{DeltaEvent, EventKind};
use crate::delta::segments::check_continuity;
use crate::delta::status::{DeltaStatus, RecorderState};
use crate::engine::Engine;
use crate::error::{BackupError, Result};
use crate::etcd::classify;

/// Tuning of the delta recorder.
#[derive(Clone, Debug)]
pub struct DeltaSettings {
    /// Longest time an event waits in the buffer before its segment is written.
    pub flush_interval: Duration,
    /// Buffer size that writes a segment at once.
    pub max_segment_bytes: usize,
    /// RPO target: lag above it shows as LAGGING.
    pub rpo_target: Duration,
}

impl Default for DeltaSettings {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(500),
            max_segment_bytes: 4 << 20,
            rpo_target: Duration::from_secs(1),
        }
    }
}

/// Why following one base snapshot stopped.
#[derive(Debug)]
pub enum FollowEnd {
    /// Shutdown or leadership loss.
    Cancelled,
    /// A newer full snapshot was committed: follow it instead.
    NewBase,
    /// The history has a hole (compaction or a missing revision); a new
    /// full snapshot is needed.
    Gap(String),
}

/// Follows etcd after base snapshots and commits segments.
#[derive(Clone, Debug)]
pub struct Recorder {
    engine: Arc<Engine>,
    settings: DeltaSettings,
    status: Arc<Mutex<DeltaStatus>>,
    /// Where the recorder reports (`/debug/workers`): its state, each
    /// committed segment, each error.
    worker: Worker,
}

/// Takes a new full snapshot (after a gap).
pub type SnapshotFn<'a> = dyn Fn() -> futures::future::BoxFuture<'a, Result<()>> + Send + Sync + 'a;

/// The recorder's name as a worker (`/debug/workers`).
pub const WORKER: &str = "delta recorder";

/// How often the recorder checks whether a newer full snapshot exists.
const BASE_CHECK: Duration = Duration::from_secs(2);

impl Recorder {
    /// A recorder over `engine`, publishing to `status`.
    pub fn new(
        engine: Arc<Engine>,
        settings: DeltaSettings,
        status: Arc<Mutex<DeltaStatus>>,
    ) -> Self {
        Self {
            engine,
            settings,
            status,
            worker: Worker::detached(WORKER),
        }
    }

    /// Reports through `worker` (the daemon's registry) from now on.
    #[must_use]
    pub fn with_worker(mut self, worker: Worker) -> Self {
        self.worker = worker;
        self
    }

    fn update(&self, f: impl FnOnce(&mut DeltaStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        self.worker.set_state(s.state.as_str());
        let lag = s.rpo_lag(Utc::now());
        crate::metrics::delta_status(s.newest_revision, lag, s.state == RecorderState::Running);
    }

    /// Follows the newest snapshot until `cancel`; `take_snapshot` is
    /// called after a gap and must commit a new full snapshot.
    pub async fn run(&self, cancel: &CancellationToken, take_snapshot: &SnapshotFn<'_>) {
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let base = match self.engine.latest_snapshot().await {
                Ok(e) => e.manifest,
                Err(BackupError::NotFound { .. }) => {
                    // Nothing to follow yet: the first snapshot starts it.
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
                Err(e) => {
                    self.failed(&e);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            match self
                .follow(&base.id, base.revision, &base.etcd.cluster_id, cancel)
                .await
            {
                Ok(FollowEnd::Cancelled) => break,
                Ok(FollowEnd::NewBase) => {}
                Ok(FollowEnd::Gap(why)) => {
                    tracing::warn!(base = %base.id, why = %why, "delta gap: taking a new full snapshot");
                    crate::metrics::delta_gap();
                    self.update(|s| {
                        s.state = RecorderState::Gap;
                        s.last_error = Some(why.clone());
                    });
                    if let Err(e) = take_snapshot().await {
                        self.failed(&e);
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
                Err(e) => {
                    // etcd or the store failed: start again from the last
                    // committed segment (the watch replays the rest).
                    self.failed(&e);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        self.update(|s| {
            s.state = RecorderState::Stopped;
            s.pending_since = None;
        });
    }

    fn failed(&self, e: &BackupError) {
        tracing::warn!(error = %e, "delta recorder");
        self.worker.failed(e);
        self.update(|s| s.last_error = Some(e.to_string()));
    }

    /// Watches from after the last committed segment of `base` (or after
    /// its revision) and commits segments until told to stop.
    pub async fn follow(
        &self,
        base: &str,
        base_revision: i64,
        base_cluster: &str,
        cancel: &CancellationToken,
    ) -> Result<FollowEnd> {
        let mut last = match self.start_after(base, base_revision, base_cluster).await? {
            Ok(l) => l,
            Err(gap) => return Ok(gap),
        };
        let resumed_from = last;
        let mut client = self.engine.etcd.client().await?;
        let eps = self.engine.etcd.endpoints().to_vec();
        let mut stream = client
            .watch(
                "",
                Some(
                    WatchOptions::new()
                        .with_all_keys()
                        .with_start_revision(last + 1)
                        .with_prev_key(),
                ),
            )
            .await
            .map_err(|e| classify(&eps, "watch", &e))?;
        tracing::info!(base, from = last + 1, "delta recorder following etcd");
        self.update(|s| {
            s.state = RecorderState::Running;
            s.base_snapshot = Some(base.to_owned());
            s.newest_revision = s.newest_revision.max(last);
            s.last_error = None;
        });
        let mut buffer: Vec<DeltaEvent> = Vec::new();
        let mut bytes = 0usize;
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut base_check = tokio::time::interval(BASE_CHECK);
        base_check.tick().await;
        loop {
            let deadline = flush_at;
            tokio::select! {
                _ = cancel.cancelled() => {
                    // Best effort: what is buffered is still in etcd's
                    // history for the next leader otherwise.
                    let _ = self.flush(base, &mut buffer, &mut bytes).await;
                    return Ok(FollowEnd::Cancelled);
                }
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                    self.flush(base, &mut buffer, &mut bytes).await?;
                    flush_at = None;
                }
                _ = base_check.tick() => {
                    if let Ok(latest) = self.engine.latest_snapshot().await
                        && latest.manifest.id != base
                    {
                        self.flush(base, &mut buffer, &mut bytes).await?;
                        return Ok(FollowEnd::NewBase);
                    }
                }
                msg = stream.message() => {
                    let resp = match msg {
                        Err(e) => {
                            self.flush(base, &mut buffer, &mut bytes).await?;
                            return Err(classify(&eps, "watch", &e));
                        }
                        Ok(None) => {
                            self.flush(base, &mut buffer, &mut bytes).await?;
                            return Err(BackupError::EtcdUnavailable {
                                endpoints: eps.join(","),
                                detail: "the watch stream ended".into(),
                            });
                        }
                        Ok(Some(r)) => r,
                    };
                    if resp.compact_revision() > 0 || resp.canceled() {
                        self.flush(base, &mut buffer, &mut bytes).await?;
                        return Ok(FollowEnd::Gap(format!(
                            "the watch from revision {} was cancelled (compacted at {}): {}",
                            last + 1,
                            resp.compact_revision(),
                            resp.cancel_reason()
                        )));
                    }
                    if let Err(gap) = absorb(resp.events(), &mut last, resumed_from, &mut buffer, &mut bytes) {
                        self.flush(base, &mut buffer, &mut bytes).await?;
                        return Ok(FollowEnd::Gap(gap));
                    }
                    if !buffer.is_empty() && flush_at.is_none() {
                        flush_at = Some(tokio::time::Instant::now() + self.settings.flush_interval);
                        let since = buffer.first().map(DeltaEvent::observed_at);
                        self.update(|s| s.pending_since = since);
                    }
                    if bytes >= self.settings.max_segment_bytes {
                        self.flush(base, &mut buffer, &mut bytes).await?;
                        flush_at = None;
                    }
                }
            }
        }
    }

    /// The revision to follow after: the last one `base`'s segments cover,
    /// or a gap when etcd is another cluster now (after a restore its
    /// revisions do not continue the base's history) or the segments have
    /// a hole.
    async fn start_after(
        &self,
        base: &str,
        base_revision: i64,
        base_cluster: &str,
    ) -> Result<std::result::Result<i64, FollowEnd>> {
        let statuses = self.engine.etcd.statuses().await?;
        if let Some(s) = statuses.first()
            && format!("{:016x}", s.cluster_id) != base_cluster
        {
            return Ok(Err(FollowEnd::Gap(format!(
                "etcd is now cluster {:016x}, snapshot {base} is of cluster {base_cluster} (restored?)",
                s.cluster_id
            ))));
        }
        let existing = self.engine.list_segments(Some(base)).await?;
        Ok(check_continuity(base_revision, &existing).map_err(|e| FollowEnd::Gap(e.to_string())))
    }

    async fn flush(
        &self,
        base: &str,
        buffer: &mut Vec<DeltaEvent>,
        bytes: &mut usize,
    ) -> Result<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(buffer);
        *bytes = 0;
        let meta = self.engine.commit_segment(base, events).await?;
        tracing::debug!(segment = %meta.id, events = meta.event_count, "delta segment committed");
        crate::metrics::delta_committed(meta.event_count);
        self.worker.succeeded();
        self.update(|s| {
            s.newest_revision = meta.last_revision;
            s.newest_at = Some(meta.last_event_at);
            s.pending_since = None;
            s.committed += 1;
        });
        Ok(())
    }
}

/// Buffers a watch response's events, checking that their revisions follow
/// `last` without a hole (several events of one revision are one group,
/// except the first revision after a resume, already covered). A hole is
/// the gap's description; the events before it are buffered.
fn absorb(
    events: &[etcd_client::Event],
    last: &mut i64,
    resumed_from: i64,
    buffer: &mut Vec<DeltaEvent>,
    bytes: &mut usize,
) -> std::result::Result<(), String> {
    let now = Utc::now().timestamp_millis();
    for ev in events {
        let Some(kv) = ev.kv() else { continue };
        let revision = kv.mod_revision();
        let same_group = revision == *last && *last > resumed_from;
        if revision != *last + 1 && !same_group {
            return Err(format!(
                "the watch jumped from revision {last} to {revision}"
            ));
        }
        *last = revision;
        let e = match ev.event_type() {
            EventType::Put => DeltaEvent {
                kind: EventKind::Put,
                revision,
                create_revision: kv.create_revision(),
                version: kv.version(),
                lease: kv.lease(),
                observed_at_ms: now,
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
            },
            EventType::Delete => DeltaEvent {
                kind: EventKind::Delete,
                revision,
                create_revision: 0,
                version: 0,
                lease: 0,
                observed_at_ms: now,
                key: kv.key().to_vec(),
                value: Vec::new(),
            },
        };
        *bytes += e.encoded_len();
        buffer.push(e);
    }
    Ok(())
}
