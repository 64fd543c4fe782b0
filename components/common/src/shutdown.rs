//! Process lifecycle: one root [`CancellationToken`], tracked tasks, and
//! signal handling.
//!
//! The first SIGTERM or SIGINT cancels the root token; every task holds a
//! child token and winds down (a leader steps down and releases the VIP,
//! listeners close, uploads abort cleanly). If that takes longer than the
//! grace period, or a second signal arrives, the process exits at once: the
//! kubelet is waiting and a hung shutdown helps nobody.
//!
//! A critical task (the Raft core, the proxy, the scheduler) that ends early,
//! with an error or a panic, takes the whole process down with a non-zero
//! exit instead of leaving a half-working daemon behind.

use std::future::Future;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::workers::{Worker, Workers};

/// A panic's message, when it was a string (as `panic!` makes it).
fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Waits for `changed` (a watch receiver's next value) unless `token` is
/// cancelled first: `false` when the watching task should end, because of
/// the cancel or because the sender is gone.
pub async fn next_change<E>(
    token: &CancellationToken,
    changed: impl Future<Output = Result<(), E>>,
) -> bool {
    tokio::select! {
        () = token.cancelled() => false,
        r = changed => r.is_ok(),
    }
}

/// Exit code when a critical task failed.
pub const EXIT_TASK_FAILED: u8 = 1;
/// Exit code when shutdown did not finish within the grace period, or a
/// second signal forced it.
pub const EXIT_FORCED: u8 = 3;

/// The lifecycle of one daemon (or one node inside a test process).
#[derive(Clone, Debug)]
pub struct Shutdown {
    root: CancellationToken,
    tracker: TaskTracker,
    failure: Arc<Mutex<Option<String>>>,
    workers: Workers,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A fresh lifecycle with nothing running.
    pub fn new() -> Self {
        Self::with_token(CancellationToken::new())
    }

    /// A lifecycle under an existing token (tests run several nodes, each
    /// cancelled separately).
    pub fn with_token(root: CancellationToken) -> Self {
        Self {
            root,
            tracker: TaskTracker::new(),
            failure: Arc::new(Mutex::new(None)),
            workers: Workers::new(),
        }
    }

    /// A child of the root token for one task or subsystem.
    pub fn token(&self) -> CancellationToken {
        self.root.child_token()
    }

    /// Starts the graceful shutdown.
    pub fn trigger(&self) {
        self.root.cancel();
    }

    /// Whether shutdown has started.
    pub fn is_shutting_down(&self) -> bool {
        self.root.is_cancelled()
    }

    /// The registry of this lifecycle's workers (`/debug/workers`).
    pub fn workers(&self) -> &Workers {
        &self.workers
    }

    /// A reporting handle for the worker `name` (spawn it under the same
    /// name, so its entry also shows how the task ended).
    pub fn worker(&self, name: impl Into<String>) -> Worker {
        self.workers.worker(name)
    }

    /// The tracker [`wait`](Self::wait) waits on, for short-lived tasks a
    /// server starts per request or per stream: shutdown waits for them
    /// (they watch a child token) within the grace period, and their end
    /// is none of the supervisor's business.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Runs `fut` as a tracked task; its outcome (an error or a panic) is
    /// logged and shown in `/debug/workers`, but does not stop the daemon.
    pub fn spawn<F>(&self, name: impl Into<String>, fut: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.supervise(name.into(), false, fut);
    }

    /// Runs `fut` as a critical task: if it ends before shutdown started
    /// (successfully, with an error, or by panicking), the whole lifecycle
    /// shuts down and [`Shutdown::wait`] reports a failure. The log line
    /// names the task and why it ended.
    pub fn spawn_critical<F>(&self, name: impl Into<String>, fut: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.supervise(name.into(), true, fut);
    }

    fn supervise<F>(&self, name: String, critical: bool, fut: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.workers.started(&name, critical);
        let root = self.root.clone();
        let failure = self.failure.clone();
        let workers = self.workers.clone();
        // Its own tokio task, so a panic is caught at the join handle.
        let inner = self.tracker.spawn(self.with_faults(&name, fut));
        self.tracker.spawn(async move {
            let outcome = match inner.await {
                Ok(Ok(())) if root.is_cancelled() || !critical => None,
                Ok(Ok(())) => Some("exited unexpectedly".to_owned()),
                Ok(Err(e)) => Some(format!("failed: {e:#}")),
                Err(e) if e.is_panic() => Some(format!("panicked: {}", panic_message(e))),
                Err(_) => Some("was cancelled".to_owned()),
            };
            workers.ended(&name, outcome.clone().map_or(Ok(()), Err));
            let Some(reason) = outcome else { return };
            if !critical {
                tracing::warn!(task = %name, reason = %reason, "task {name} {reason}");
                return;
            }
            tracing::error!(
                task = %name,
                reason = %reason,
                "critical task {name} {reason}; shutting down"
            );
            let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
            f.get_or_insert_with(|| format!("critical task {name} {reason}"));
            root.cancel();
        });
    }

    /// With the `faults` feature, `fut` panics when a test calls
    /// [`Workers::inject_panic`] for `name`; otherwise it is `fut`.
    #[cfg(feature = "faults")]
    fn with_faults<F>(
        &self,
        name: &str,
        fut: F,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'static
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let fault = self.workers.fault(name);
        let name = name.to_owned();
        async move {
            tokio::select! {
                r = fut => r,
                () = fault.notified() => panic!("fault injected into {name}"),
            }
        }
    }

    #[cfg(not(feature = "faults"))]
    fn with_faults<F>(&self, _name: &str, fut: F) -> F {
        fut
    }

    /// Cancels the root token on the first SIGTERM/SIGINT; a second one
    /// exits the process immediately.
    pub fn listen_for_signals(&self) -> std::io::Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let root = self.root.clone();
        // Outside the tracker on purpose: it must outlive the drain (a
        // second signal during it exits at once), and it ends with the
        // process.
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received; shutting down gracefully"),
                _ = int.recv() => tracing::info!("SIGINT received; shutting down gracefully"),
                _ = root.cancelled() => {}
            }
            root.cancel();
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal received; exiting immediately");
            std::process::exit(i32::from(EXIT_FORCED));
        });
        Ok(())
    }

    /// Waits until shutdown starts, then for every tracked task to finish
    /// within `grace`. Returns the process exit code.
    pub async fn wait(self, grace: Duration) -> ExitCode {
        self.root.cancelled().await;
        self.tracker.close();
        let forced = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err();
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match (failure, forced) {
            (Some(reason), _) => {
                tracing::error!(reason, "exiting after a failure");
                ExitCode::from(EXIT_TASK_FAILED)
            }
            (None, true) => {
                tracing::warn!(grace = ?grace, "tasks did not finish within the grace period");
                ExitCode::from(EXIT_FORCED)
            }
            (None, false) => {
                tracing::info!("shut down cleanly");
                ExitCode::SUCCESS
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::TaskState;

    #[tokio::test]
    async fn graceful_shutdown_waits_for_tasks() {
        let s = Shutdown::new();
        let token = s.token();
        let done = Arc::new(Mutex::new(false));
        let d = done.clone();
        s.spawn("worker", async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            *d.lock().unwrap() = true;
            Ok(())
        });
        s.trigger();
        assert_eq!(
            s.clone().wait(Duration::from_secs(5)).await,
            ExitCode::SUCCESS
        );
        assert!(*done.lock().unwrap());
    }

    #[tokio::test]
    async fn next_change_is_false_once_cancelled_or_the_sender_is_gone() {
        let token = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::watch::channel(0);
        tx.send(1).unwrap();
        assert!(next_change(&token, rx.changed()).await);
        drop(tx);
        assert!(!next_change(&token, rx.changed()).await);
        let (_tx, mut rx) = tokio::sync::watch::channel(0);
        token.cancel();
        assert!(!next_change(&token, rx.changed()).await);
    }

    #[tokio::test]
    async fn failed_critical_task_takes_the_process_down() {
        let s = Shutdown::new();
        s.spawn_critical("raft", async { anyhow::bail!("disk gone") });
        let code = tokio::time::timeout(Duration::from_secs(5), s.wait(Duration::from_secs(1)))
            .await
            .unwrap();
        assert_eq!(code, ExitCode::from(EXIT_TASK_FAILED));
    }

    #[tokio::test]
    async fn panicking_critical_task_takes_the_process_down() {
        let s = Shutdown::new();
        s.spawn_critical("proxy", async { panic!("boom") });
        let code = tokio::time::timeout(Duration::from_secs(5), s.wait(Duration::from_secs(1)))
            .await
            .unwrap();
        assert_eq!(code, ExitCode::from(EXIT_TASK_FAILED));
    }

    #[tokio::test]
    async fn workers_show_how_each_task_ended() {
        let s = Shutdown::new();
        s.spawn("seeder", async { Ok(()) });
        s.spawn("probe", async { panic!("bad input") });
        let token = s.token();
        s.spawn_critical("scheduler", async move {
            token.cancelled().await;
            Ok(())
        });
        let workers = s.workers().clone();
        tokio::time::timeout(Duration::from_secs(5), async {
            while workers.get("probe").unwrap().task != TaskState::Failed
                || workers.get("seeder").unwrap().task != TaskState::Finished
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        // A task that is not critical does not stop the others.
        assert!(!s.is_shutting_down());
        let probe = workers.get("probe").unwrap();
        assert_eq!(probe.last_error.unwrap().message, "panicked: bad input");
        assert_eq!(workers.get("scheduler").unwrap().task, TaskState::Running);
        s.trigger();
        assert_eq!(s.wait(Duration::from_secs(5)).await, ExitCode::SUCCESS);
        assert_eq!(workers.get("scheduler").unwrap().task, TaskState::Finished);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_task_is_cut_off_after_the_grace_period() {
        let s = Shutdown::new();
        s.spawn("stuck", std::future::pending());
        s.trigger();
        assert_eq!(
            s.wait(Duration::from_secs(10)).await,
            ExitCode::from(EXIT_FORCED)
        );
    }
}
