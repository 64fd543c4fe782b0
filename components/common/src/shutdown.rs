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

    /// Runs `fut` as a tracked task; its outcome is only logged.
    pub fn spawn<F>(&self, name: &'static str, fut: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tracker.spawn(async move {
            if let Err(e) = fut.await {
                tracing::warn!(task = name, error = format!("{e:#}"), "task failed");
            }
        });
    }

    /// Runs `fut` as a critical task: if it ends before shutdown started
    /// (successfully, with an error, or by panicking), the whole lifecycle
    /// shuts down and [`Shutdown::wait`] reports a failure.
    pub fn spawn_critical<F>(&self, name: &'static str, fut: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let root = self.root.clone();
        let failure = self.failure.clone();
        let inner = tokio::spawn(fut);
        self.tracker.spawn(async move {
            let outcome = match inner.await {
                Ok(Ok(())) if root.is_cancelled() => None,
                Ok(Ok(())) => Some("exited unexpectedly".to_owned()),
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(e) if e.is_panic() => Some("panicked".to_owned()),
                Err(_) => Some("was cancelled".to_owned()),
            };
            if let Some(reason) = outcome {
                tracing::error!(task = name, reason, "critical task ended; shutting down");
                let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert_with(|| format!("critical task {name} {reason}"));
                root.cancel();
            }
        });
    }

    /// Cancels the root token on the first SIGTERM/SIGINT; a second one
    /// exits the process immediately.
    pub fn listen_for_signals(&self) -> std::io::Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let root = self.root.clone();
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
