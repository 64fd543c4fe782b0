//! The reasons an open connection is closed from outside (shutdown grace
//! over, the backend's drain deadline passed), checked without a lock on
//! every wake-up.
//!
//! A `CancellationToken`'s `cancelled()` future takes its `Notify`'s mutex
//! each time it is polled while pending, and `select!` polls every branch
//! on every wake-up of the task: a connection would take two shared locks
//! (the listener's token, the backend's token) per chunk of data. Instead
//! the two futures get a waker of their own, and are polled only when that
//! waker fired; the rest of the time checking them is one atomic swap.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio_util::sync::WaitForCancellationFuture;

/// Why the connection must close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CloseReason {
    /// The listener's shutdown grace is over.
    Shutdown,
    /// The backend's drain deadline passed.
    DrainDeadline,
}

struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Resolves when either token is cancelled.
pub(super) struct CloseSignals<'p, 't> {
    shutdown: Pin<&'p mut WaitForCancellationFuture<'t>>,
    drain: Pin<&'p mut WaitForCancellationFuture<'t>>,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<'p, 't> CloseSignals<'p, 't> {
    pub(super) fn new(
        shutdown: Pin<&'p mut WaitForCancellationFuture<'t>>,
        drain: Pin<&'p mut WaitForCancellationFuture<'t>>,
    ) -> Self {
        let flag = Arc::new(Flag {
            // Poll the tokens once at the start so they register.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Self {
            shutdown,
            drain,
            flag,
            waker,
        }
    }
}

impl Future for CloseSignals<'_, '_> {
    type Output = CloseReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let this = self.get_mut();
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut own = Context::from_waker(&this.waker);
        if this.shutdown.as_mut().poll(&mut own).is_ready() {
            return Poll::Ready(CloseReason::Shutdown);
        }
        if this.drain.as_mut().poll(&mut own).is_ready() {
            return Poll::Ready(CloseReason::DrainDeadline);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    #[tokio::test]
    async fn either_token_closes_and_says_which() {
        for which in [CloseReason::Shutdown, CloseReason::DrainDeadline] {
            let (s, d) = (CancellationToken::new(), CancellationToken::new());
            let (sf, df) = (s.cancelled(), d.cancelled());
            tokio::pin!(sf);
            tokio::pin!(df);
            let signals = CloseSignals::new(sf, df);
            let (s2, d2) = (s.clone(), d.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match which {
                    CloseReason::Shutdown => s2.cancel(),
                    CloseReason::DrainDeadline => d2.cancel(),
                }
            });
            let got = tokio::time::timeout(Duration::from_secs(5), signals)
                .await
                .unwrap();
            assert_eq!(got, which);
        }
    }
}
