//! What each long-running task of a daemon is doing, for the operator who
//! asks "is the scheduler stuck?": its state, when it last succeeded and
//! its last error. The admin server's `/debug/workers` lists them as JSON.
//!
//! Every task a [`Shutdown`](crate::shutdown::Shutdown) spawns by name
//! has an entry (its lifecycle: running, finished, failed); a worker that
//! has more to say takes a [`Worker`] handle and reports through it. The
//! registry is a mutex-guarded map written on state changes, not per
//! request or per packet, so reporting costs nothing on the data path.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;

/// Where a worker's task is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// The task runs.
    Running,
    /// The task ended on its own or because shutdown asked it to.
    Finished,
    /// The task failed: returned an error, panicked, or (a critical one)
    /// ended before shutdown.
    Failed,
}

/// The last error a worker reported, with its time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastError {
    /// RFC 3339, UTC.
    pub at: String,
    /// The error, with its causes.
    pub message: String,
}

/// One worker's entry in `/debug/workers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// The task's name (`scheduler`, `vip`, `probe cp-1/readyz`).
    pub name: String,
    /// Whether its end stops the daemon.
    pub critical: bool,
    /// The task's lifecycle.
    pub task: TaskState,
    /// What the worker says it is doing (`leading`, `standby`, `up`…);
    /// `running` until it says more.
    pub state: String,
    /// When `state` last changed (RFC 3339, UTC).
    pub since: String,
    /// When the worker last completed its unit of work (a snapshot, a
    /// probe, an acknowledged report, a committed verdict).
    pub last_success: Option<String>,
    /// The worker's most recent error; a later success does not clear it
    /// (compare the times).
    pub last_error: Option<LastError>,
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[derive(Debug, Default)]
struct Inner {
    workers: BTreeMap<String, WorkerStatus>,
    /// Workers a test asked to panic (the `faults` feature).
    #[cfg(feature = "faults")]
    faults: BTreeMap<String, Arc<tokio::sync::Notify>>,
}

/// The registry of a daemon's workers. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Workers {
    inner: Arc<Mutex<Inner>>,
}

impl Workers {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers (or re-registers, after a restart of the same task) the
    /// task `name` as running.
    pub(crate) fn started(&self, name: &str, critical: bool) {
        let mut inner = self.lock();
        let entry = inner
            .workers
            .entry(name.to_owned())
            .or_insert_with(|| WorkerStatus {
                name: name.to_owned(),
                critical,
                task: TaskState::Running,
                state: "running".to_owned(),
                since: now(),
                last_success: None,
                last_error: None,
            });
        entry.critical = critical;
        entry.task = TaskState::Running;
    }

    /// Records how the task `name` ended.
    pub(crate) fn ended(&self, name: &str, outcome: Result<(), String>) {
        let mut inner = self.lock();
        if let Some(w) = inner.workers.get_mut(name) {
            match outcome {
                Ok(()) => w.task = TaskState::Finished,
                Err(message) => {
                    w.task = TaskState::Failed;
                    w.last_error = Some(LastError { at: now(), message });
                }
            }
        }
    }

    /// A handle for the worker `name` to report through; creates its
    /// entry if the task is not spawned yet.
    pub fn worker(&self, name: impl Into<String>) -> Worker {
        let name: Arc<str> = name.into().into();
        self.lock()
            .workers
            .entry(name.to_string())
            .or_insert_with(|| WorkerStatus {
                name: name.to_string(),
                critical: false,
                task: TaskState::Running,
                state: "starting".to_owned(),
                since: now(),
                last_success: None,
                last_error: None,
            });
        Worker {
            name,
            workers: self.clone(),
        }
    }

    /// Every worker, by name.
    pub fn list(&self) -> Vec<WorkerStatus> {
        self.lock().workers.values().cloned().collect()
    }

    /// One worker's entry.
    pub fn get(&self, name: &str) -> Option<WorkerStatus> {
        self.lock().workers.get(name).cloned()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut WorkerStatus)) {
        if let Some(w) = self.lock().workers.get_mut(name) {
            f(w);
        }
    }
}

/// Fault injection for tests of the lifecycle: a test asks a worker of a
/// daemon it runs in-process to panic, and checks that the daemon stops.
/// Compiled only with the `faults` feature (the daemons' dev-dependencies
/// enable it), so no production build can reach it.
#[cfg(feature = "faults")]
impl Workers {
    /// Makes the task named `name` panic at once (it need not be spawned
    /// yet: it panics when it starts).
    pub fn inject_panic(&self, name: &str) {
        self.fault(name).notify_one();
    }

    /// The notification [`inject_panic`](Self::inject_panic) fires for `name`.
    pub(crate) fn fault(&self, name: &str) -> Arc<tokio::sync::Notify> {
        self.lock()
            .faults
            .entry(name.to_owned())
            .or_default()
            .clone()
    }
}

/// A worker's reporting handle. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Worker {
    name: Arc<str>,
    workers: Workers,
}

impl Worker {
    /// A handle that reports into a registry of its own: what a worker
    /// built outside a daemon (a unit test, a tool) reports into, until
    /// the daemon hands it a handle of its registry.
    pub fn detached(name: &str) -> Self {
        Workers::new().worker(name)
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets what the worker is doing; the time changes only when the state
    /// does.
    pub fn set_state(&self, state: &str) {
        self.workers.update(&self.name, |w| {
            if w.state != state {
                state.clone_into(&mut w.state);
                w.since = now();
            }
        });
    }

    /// Records a completed unit of work.
    pub fn succeeded(&self) {
        self.workers
            .update(&self.name, |w| w.last_success = Some(now()));
    }

    /// Records an error (the worker goes on; a task that ends with one is
    /// recorded by its supervisor).
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        let message = format!("{error:#}");
        self.workers.update(&self.name, |w| {
            w.last_error = Some(LastError { at: now(), message });
        });
    }

    /// Records the outcome of one unit of work.
    pub fn record<T, E: std::fmt::Display>(&self, outcome: &Result<T, E>) {
        match outcome {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_reports_state_success_and_error() {
        let workers = Workers::new();
        workers.started("scheduler", true);
        let w = workers.worker("scheduler");
        let first = workers.get("scheduler").unwrap();
        assert_eq!(
            (first.state.as_str(), first.task.clone(), first.critical),
            ("running", TaskState::Running, true)
        );
        w.set_state("leading");
        w.succeeded();
        w.failed(&anyhow::anyhow!("etcd unreachable"));
        let s = workers.get("scheduler").unwrap();
        assert_eq!(s.state, "leading");
        assert!(s.last_success.is_some());
        assert_eq!(s.last_error.unwrap().message, "etcd unreachable");

        workers.ended("scheduler", Err("panicked".into()));
        let s = workers.get("scheduler").unwrap();
        assert_eq!(s.task, TaskState::Failed);
        assert_eq!(s.last_error.unwrap().message, "panicked");
        let json = serde_json::to_value(workers.list()).unwrap();
        assert_eq!(json[0]["task"], "failed");
        assert_eq!(json[0]["state"], "leading");
        assert!(json[0]["lastSuccess"].is_string(), "{json}");
    }
}
