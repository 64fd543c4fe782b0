//! The running service: scheduled snapshots, retention and drills on the
//! elected leader, on-demand operations on any instance, and the state that
//! `GetStatus` reports.
//!
//! Scheduled work runs only while this instance leads, under a token that
//! is cancelled the moment leadership is lost, so an in-flight scheduled
//! upload stops and aborts instead of committing from a former leader; the
//! last check before the manifest is written asks again. At most one
//! snapshot runs per instance at a time (the API answers ABORTED to a
//! second one).
//!
//! While leading, the delta recorder ([`crate::delta::Recorder`]) follows
//! etcd after the newest snapshot; a gap in the history makes it ask for a
//! new full snapshot, taken through the same path as scheduled ones.
//! Both are held while etcd is a cluster the store's history does not
//! know (hosts rebuilt with an empty etcd, about to be restored from this
//! store): [`crate::Engine::check_history`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_common::workers::Worker;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::delta::{DeltaSettings, DeltaStatus, Recorder, RecorderPause};
use crate::engine::Engine;
use crate::error::{BackupError, Result};
use crate::schedule::election::LeaderState;
use crate::schedule::ticks::Schedule;
use crate::snapshot::manifest::{Manifest, Trigger, VerificationRecord};
use crate::snapshot::retention::RetentionPolicy;
use crate::snapshot::{Progress, SnapshotOptions};
use crate::verify::VerifyProgress;

/// How often a held snapshot after a delta gap (etcd is a cluster foreign
/// to the store's history) is asked for again.
const HELD_RECHECK: Duration = Duration::from_secs(10);

/// The scheduler's name as a worker (`/debug/workers`).
pub const SCHEDULER: &str = "scheduler";

/// Scheduling knobs, from the config.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    /// When snapshots are due; `None`: on demand only.
    pub schedule: Option<Schedule>,
    /// Attempts after a failed scheduled snapshot.
    pub retries: u32,
    /// Pause before each retry.
    pub retry_backoff: Duration,
    /// Which snapshots retention keeps.
    pub retention: RetentionPolicy,
    /// How often retention runs besides after each snapshot.
    pub retention_interval: Duration,
    /// How often the newest snapshot is drilled; `None`: never.
    pub drill_interval: Option<Duration>,
    /// etcd election name.
    pub election_name: String,
    /// Continuous deltas while leading; `None`: off.
    pub deltas: Option<DeltaSettings>,
}

/// An error remembered for status.
#[derive(Clone, Debug)]
pub struct ErrorRecord {
    /// When.
    pub at: DateTime<Utc>,
    /// What was being done.
    pub operation: String,
    /// The error.
    pub message: String,
}

#[derive(Debug, Default)]
struct State {
    next_run: Option<DateTime<Utc>>,
    last_error: Option<ErrorRecord>,
    last_drill: Option<VerificationRecord>,
    last_verify: Option<VerificationRecord>,
}

/// The service shared by the scheduler and the gRPC handlers.
#[derive(Debug)]
pub struct Service {
    engine: Arc<Engine>,
    settings: ServiceSettings,
    leader: watch::Receiver<LeaderState>,
    state: Mutex<State>,
    snapshot_lock: tokio::sync::Mutex<()>,
    delta_status: Arc<Mutex<DeltaStatus>>,
    restore_lock: tokio::sync::Mutex<()>,
    restore_state: Mutex<Option<RestoreRunning>>,
    recorder_pause: RecorderPause,
    /// Where the scheduler reports (`/debug/workers`).
    scheduler: Worker,
    /// Where the delta recorder reports.
    recorder: Worker,
}

/// The restore this instance coordinates now.
#[derive(Clone, Debug)]
pub struct RestoreRunning {
    /// Restore id.
    pub restore_id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its phase, as the API numbers them.
    pub phase: i32,
    /// When that phase began.
    pub phase_started_at: DateTime<Utc>,
    /// How long each finished phase and node step took.
    pub timings: Vec<bulwark_api::backup::v1::PhaseTiming>,
}

impl Service {
    /// A service over `engine`, leading when `leader` says so.
    pub fn new(
        engine: Arc<Engine>,
        settings: ServiceSettings,
        leader: watch::Receiver<LeaderState>,
    ) -> Self {
        Self {
            engine,
            settings,
            leader,
            state: Mutex::new(State::default()),
            snapshot_lock: tokio::sync::Mutex::new(()),
            delta_status: Arc::new(Mutex::new(DeltaStatus::default())),
            restore_lock: tokio::sync::Mutex::new(()),
            restore_state: Mutex::new(None),
            recorder_pause: RecorderPause::default(),
            scheduler: Worker::detached(SCHEDULER),
            recorder: Worker::detached(crate::delta::recorder::WORKER),
        }
    }

    /// Reports the scheduler's and the delta recorder's state through
    /// these handles (the daemon's registry) from now on.
    #[must_use]
    pub fn with_workers(mut self, scheduler: Worker, recorder: Worker) -> Self {
        self.scheduler = scheduler;
        self.recorder = recorder;
        self
    }

    /// The delta recorder's pause, held by this node's restore agent.
    pub fn recorder_pause(&self) -> &RecorderPause {
        &self.recorder_pause
    }

    /// The delta recorder's status.
    pub fn delta_status(&self) -> DeltaStatus {
        self.delta_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The restore lock: one restore per instance at a time.
    pub fn try_restore_lock(&self) -> Result<tokio::sync::MutexGuard<'_, ()>> {
        self.restore_lock.try_lock().map_err(|_| {
            BackupError::Busy(format!(
                "a restore is already running on {}",
                self.engine.node_name
            ))
        })
    }

    /// Sets (or clears) the restore shown in status.
    pub fn set_restore(&self, r: Option<RestoreRunning>) {
        *self.restore_state.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// The restore shown in status.
    pub fn restore_running(&self) -> Option<RestoreRunning> {
        self.restore_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The settings.
    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    /// Whether this instance leads now.
    pub fn is_leader(&self) -> bool {
        self.leader.borrow().is_leader
    }

    /// When the next scheduled snapshot is due (as computed by the leader
    /// loop, or from the schedule otherwise).
    pub fn next_run(&self) -> Option<DateTime<Utc>> {
        self.lock().next_run.or_else(|| {
            self.settings
                .schedule
                .as_ref()
                .and_then(|s| s.next_after(Utc::now()))
        })
    }

    /// The last error of scheduled work.
    pub fn last_error(&self) -> Option<ErrorRecord> {
        self.lock().last_error.clone()
    }

    /// The last drill (a throwaway etcd started from a snapshot) this
    /// instance ran.
    pub fn last_drill(&self) -> Option<VerificationRecord> {
        self.lock().last_drill.clone()
    }

    /// The last plain verification (hashes and decryption, no etcd) this
    /// instance ran. Kept apart from drills: verifying an old snapshot
    /// says nothing about whether the newest one restores.
    pub fn last_verify(&self) -> Option<VerificationRecord> {
        self.lock().last_verify.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember_error(&self, operation: &str, e: &BackupError) {
        self.scheduler.failed(&format_args!("{operation}: {e}"));
        self.lock().last_error = Some(ErrorRecord {
            at: Utc::now(),
            operation: operation.to_owned(),
            message: e.to_string(),
        });
    }

    /// Takes a snapshot (one at a time per instance) and records metrics.
    pub async fn snapshot(
        &self,
        options: SnapshotOptions,
        progress: &dyn Progress,
        cancel: &CancellationToken,
        may_commit: &(dyn Fn() -> Result<()> + Send + Sync),
    ) -> Result<Manifest> {
        let _guard = self
            .snapshot_lock
            .try_lock()
            .map_err(|_| BackupError::Busy(self.engine.node_name.clone()))?;
        let result = self
            .engine
            .take_snapshot(options, progress, cancel, may_commit)
            .await;
        match &result {
            Ok(m) => crate::metrics::snapshot_committed(m),
            Err(e) => crate::metrics::snapshot_failed(e),
        }
        result
    }

    /// A scheduled (or after-a-gap) snapshot only of a cluster that
    /// continues the store's history ([`Engine::check_history`]): fresh
    /// hosts' empty etcd is not backed up over the backups it is about to
    /// be restored from. An operator's snapshot is never held.
    async fn history_check(&self) -> Result<()> {
        let statuses = self.engine.etcd.statuses().await?;
        match statuses.first() {
            Some(s) => self.engine.check_history(s.cluster_id).await,
            None => Ok(()),
        }
    }

    /// Verifies a snapshot and records metrics and status.
    pub async fn verify(
        &self,
        id: &str,
        drill: bool,
        progress: &dyn VerifyProgress,
        cancel: &CancellationToken,
    ) -> Result<VerificationRecord> {
        let record = self
            .engine
            .verify_snapshot(id, drill, progress, cancel)
            .await?;
        crate::metrics::verified(&record);
        let mut state = self.lock();
        let slot = if record.drill {
            &mut state.last_drill
        } else {
            &mut state.last_verify
        };
        *slot = Some(record.clone());
        Ok(record)
    }

    /// Runs the scheduler until `cancel`: waits for leadership, leads until
    /// it is lost, and so on.
    pub async fn run_scheduler(self: Arc<Self>, cancel: CancellationToken) {
        let mut rx = self.leader.clone();
        loop {
            self.scheduler.set_state("standby");
            while !rx.borrow_and_update().is_leader {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
            self.scheduler.set_state("leading");
            let lead = cancel.child_token();
            // Ends the lead when leadership is lost; part of this task
            // (not a task of its own), so nothing outlives the lead.
            let watcher = async {
                let mut rx = rx.clone();
                tokio::select! {
                    _ = lead.cancelled() => {}
                    _ = async {
                        while rx.borrow_and_update().is_leader {
                            if rx.changed().await.is_err() {
                                break;
                            }
                        }
                    } => {}
                }
                lead.cancel();
            };
            let work = async {
                let deltas = async {
                    if let Some(settings) = self.settings.deltas.clone() {
                        self.record_deltas(settings, &lead).await;
                    }
                };
                tokio::join!(self.lead(&lead), deltas);
                lead.cancel();
            };
            tokio::join!(work, watcher);
            self.lock().next_run = None;
            if cancel.is_cancelled() {
                return;
            }
        }
    }

    /// The delta recorder while leading, stopped (its buffer flushed)
    /// while a restore holds this node and started again after it.
    async fn record_deltas(&self, settings: DeltaSettings, lead: &CancellationToken) {
        let pause = &self.recorder_pause;
        while !lead.is_cancelled() {
            if let Some(restore_id) = pause.held_by() {
                tracing::info!(%restore_id, "delta recorder paused while the restore runs");
                tokio::select! {
                    _ = lead.cancelled() => return,
                    _ = pause.resumed() => {}
                }
                tracing::info!(%restore_id, "delta recorder resumes");
            }
            let recording = lead.child_token();
            let recorder = Recorder::new(
                self.engine.clone(),
                settings.clone(),
                self.delta_status.clone(),
            )
            .with_worker(self.recorder.clone());
            let run = async {
                recorder
                    .run(&recording, &|| Box::pin(self.gap_snapshot(lead)))
                    .await;
                recording.cancel();
            };
            // A pause cancels the recorder's token rather than dropping it,
            // so it flushes what it buffered (its cancel path).
            let stop = async {
                tokio::select! {
                    _ = pause.paused() => recording.cancel(),
                    _ = recording.cancelled() => {}
                }
            };
            tokio::join!(run, stop);
        }
    }

    /// Scheduled work while leading.
    async fn lead(&self, lead: &CancellationToken) {
        let now = Utc::now();
        // A leader that died mid-tick, or a cluster starting up: take the
        // last tick's snapshot now unless one was committed for it.
        if let Some(prev) = self
            .settings
            .schedule
            .as_ref()
            .and_then(|s| s.last_at_or_before(now))
        {
            match self.tick_done(prev).await {
                Ok(true) => {}
                Ok(false) => self.scheduled_snapshot(prev, lead).await,
                Err(e) => self.remember_error("listing snapshots", &e),
            }
        }
        let mut next_retention = Utc::now() + to_delta(self.settings.retention_interval);
        let mut next_drill = self
            .settings
            .drill_interval
            .map(|d| Utc::now() + to_delta(d));
        loop {
            let now = Utc::now();
            let next_tick = self
                .settings
                .schedule
                .as_ref()
                .and_then(|s| s.next_after(now));
            self.lock().next_run = next_tick;
            let wake = [Some(next_retention), next_drill, next_tick]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(next_retention);
            let sleep = (wake - now).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = lead.cancelled() => return,
                _ = tokio::time::sleep(sleep) => {}
            }
            let now = Utc::now();
            if let Some(tick) = next_tick.filter(|t| *t <= now) {
                self.scheduled_snapshot(tick, lead).await;
            }
            if lead.is_cancelled() {
                return;
            }
            if next_retention <= now {
                self.retention().await;
                next_retention = now + to_delta(self.settings.retention_interval);
            }
            if let (Some(at), Some(every)) = (next_drill, self.settings.drill_interval)
                && at <= now
            {
                self.scheduled_drill(lead).await;
                next_drill = Some(now + to_delta(every));
            }
        }
    }

    /// Whether a scheduled snapshot for `tick` (or a later one) is committed.
    async fn tick_done(&self, tick: DateTime<Utc>) -> Result<bool> {
        Ok(self.engine.list_snapshots().await?.iter().any(|s| {
            s.manifest.trigger == Trigger::Scheduled && s.manifest.scheduled_for >= Some(tick)
        }))
    }

    /// A full snapshot after a delta gap, committed only while leading.
    async fn gap_snapshot(&self, lead: &CancellationToken) -> Result<()> {
        if let Err(e) = self.history_check().await {
            self.remember_error("snapshot after a delta gap", &e);
            // The recorder asks again at once; while the cluster stays
            // foreign, each ask lists the catalog: not every second.
            tokio::select! {
                _ = lead.cancelled() => {}
                _ = tokio::time::sleep(HELD_RECHECK) => {}
            }
            return Err(e);
        }
        let may_commit = self.leading_now();
        let options = SnapshotOptions {
            trigger: Trigger::Scheduled,
            scheduled_for: None,
            note: "taken after a gap in the delta history".into(),
            member_name: None,
        };
        match self.snapshot(options, &(), lead, &may_commit).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.remember_error("snapshot after a delta gap", &e);
                Err(e)
            }
        }
    }

    /// A check that this instance still leads in the current term.
    fn leading_now(&self) -> impl Fn() -> Result<()> + Send + Sync + use<> {
        let term = self.leader.borrow().term;
        let leader = self.leader.clone();
        move || {
            let s = leader.borrow();
            if s.is_leader && s.term == term {
                Ok(())
            } else {
                Err(BackupError::Cancelled(
                    "lost leadership before commit".into(),
                ))
            }
        }
    }

    /// The scheduled snapshot of `tick`, retried up to `retries` times
    /// while `lead` holds, then retention.
    pub async fn scheduled_snapshot(&self, tick: DateTime<Utc>, lead: &CancellationToken) {
        if let Err(e) = self.history_check().await {
            tracing::warn!(tick = %tick, error = %e, "scheduled snapshot held");
            self.remember_error("scheduled snapshot", &e);
            crate::metrics::snapshot_failed(&e);
            return;
        }
        let attempts = self.settings.retries + 1;
        let may_commit = self.leading_now();
        for attempt in 1..=attempts {
            let options = SnapshotOptions {
                trigger: Trigger::Scheduled,
                scheduled_for: Some(tick),
                note: String::new(),
                member_name: None,
            };
            match self.snapshot(options, &(), lead, &may_commit).await {
                Ok(_) => {
                    self.lock().last_error = None;
                    self.scheduler.succeeded();
                    self.retention().await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(attempt, attempts, tick = %tick, error = %e, "scheduled snapshot failed");
                    self.remember_error("scheduled snapshot", &e);
                    if lead.is_cancelled() || attempt == attempts {
                        return;
                    }
                    tokio::select! {
                        _ = lead.cancelled() => return,
                        _ = tokio::time::sleep(self.settings.retry_backoff) => {}
                    }
                }
            }
        }
    }

    async fn retention(&self) {
        match self
            .engine
            .apply_retention(&self.settings.retention, Utc::now())
            .await
        {
            Ok(o) => {
                crate::metrics::retention(o.deleted.len());
                crate::metrics::garbage_collected(&o.garbage);
                self.scheduler.succeeded();
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention failed");
                self.remember_error("retention", &e);
            }
        }
    }

    async fn scheduled_drill(&self, lead: &CancellationToken) {
        let latest = match self.engine.latest_snapshot().await {
            Ok(s) => s,
            Err(BackupError::NotFound { .. }) => return,
            Err(e) => {
                self.remember_error("scheduled drill", &e);
                return;
            }
        };
        match self.verify(&latest.manifest.id, true, &(), lead).await {
            Ok(_) => self.scheduler.succeeded(),
            Err(e) => {
                tracing::warn!(error = %e, "scheduled drill could not run");
                self.remember_error("scheduled drill", &e);
            }
        }
    }
}

fn to_delta(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}
