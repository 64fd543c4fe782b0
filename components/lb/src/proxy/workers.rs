//! The data path's threads: each runs its own single-threaded Tokio
//! runtime, and a connection lives its whole life on one of them, as in
//! HAProxy's or nginx's thread-per-core model.
//!
//! On the work-stealing runtime the daemon uses for Raft, gRPC and the
//! rest, a connection's task could be woken on one worker and stolen by
//! another: each proxied message could cost a cross-thread wake-up (a
//! futex call and a context switch) on top of its read and write. Here the
//! thread whose epoll saw a socket become ready is the one that reads it,
//! copies, writes and goes back to epoll: nothing else is involved.
//!
//! Each thread normally accepts on a listener of its own
//! ([`super::listeners`]) and serves what it accepts ([`Pool::spawn_near`]),
//! unless it already serves clearly more than the least-loaded thread
//! (one connection plus an eighth): the kernel spreads new connections by
//! a hash, not by load, and a few dozen long-lived connections (watches,
//! keep-alive clients) would otherwise land unevenly and leave one thread
//! the busier for their whole life. Only when the per-thread listeners cannot be
//! opened does one acceptor hand each new connection to the thread with
//! the fewest live connections (ties rotate, [`Workers::spawn`]).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// One data-path thread.
struct Worker {
    handle: Handle,
    /// Connections it is serving now.
    live: Arc<AtomicUsize>,
}

/// The threads, as the accept loops on them see them.
#[derive(Clone)]
pub(super) struct Pool(Arc<[Worker]>);

impl Pool {
    /// The thread with the fewest live connections, searching from `from`
    /// (so ties go to `from`), and its count.
    fn least_loaded(&self, from: usize) -> (usize, usize) {
        let n = self.0.len();
        let mut best = (from % n, usize::MAX);
        for k in 0..n {
            let i = (from + k) % n;
            let load = self.0[i].live.load(Ordering::Relaxed);
            if load < best.1 {
                best = (i, load);
            }
        }
        best
    }

    /// Runs `connection` on thread `here` (the one that accepted it), or on
    /// the least-loaded thread when `here` serves more than [`slack`]
    /// connections beyond it.
    pub(super) fn spawn_near(
        &self,
        here: usize,
        connection: impl Future<Output = ()> + Send + 'static,
    ) {
        let here = here % self.0.len();
        let (best, best_load) = self.least_loaded(here);
        let mine = self.0[here].live.load(Ordering::Relaxed);
        let target = if mine <= best_load + slack(best_load) {
            here
        } else {
            best
        };
        self.spawn_on(target, connection);
    }

    fn spawn_on(&self, i: usize, connection: impl Future<Output = ()> + Send + 'static) {
        let worker = &self.0[i];
        let live = LiveGuard::new(worker.live.clone());
        worker.handle.spawn(async move {
            let _live = live;
            connection.await;
        });
    }
}

/// How many connections a thread may serve beyond the least-loaded one
/// and still keep what it accepts: one, plus an eighth of that load. A
/// hand-off costs a cross-thread wake-up, and with short connections the
/// counts move on every accept, so a strict bound would hand off a large
/// share of them; long-lived connections stay spread within about 12 %.
fn slack(least: usize) -> usize {
    1 + least / 8
}

/// The threads of one listener. Dropping this stops them: a connection
/// still open then is closed (serve drops it only after its grace).
pub(super) struct Workers {
    workers: Pool,
    /// Where the search for the least-loaded thread starts next time.
    next: usize,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` threads (at least one), named `proxy-<n>`.
    pub(super) fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut workers = Vec::with_capacity(count.max(1));
        for n in 0..count.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let token = stop.clone();
            std::thread::Builder::new()
                .name(format!("proxy-{n}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    // Runs the connections spawned onto it until stopped;
                    // dropping the runtime then closes whatever is left.
                    runtime.block_on(token.cancelled());
                })?;
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("a data-path thread exited while starting"))??;
            workers.push(Worker {
                handle,
                live: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Self {
            workers: Pool(workers.into()),
            next: 0,
            stop,
        })
    }

    /// How many threads there are.
    pub(super) fn len(&self) -> usize {
        self.workers.0.len()
    }

    /// The threads, for the accept loops that run on them.
    pub(super) fn pool(&self) -> Pool {
        self.workers.clone()
    }

    /// Runs `task` on thread `i` (modulo their number); its result comes
    /// back through the handle, which any runtime may await.
    pub(super) fn run_on<T: Send + 'static>(
        &self,
        i: usize,
        task: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.workers.0[i % self.len()].handle.spawn(task)
    }

    /// Runs `connection` on the thread with the fewest live connections.
    /// The future is first polled there, so a socket it registers (e.g.
    /// `TcpStream::from_std` at its start) belongs to that thread's runtime.
    pub(super) fn spawn(&mut self, connection: impl Future<Output = ()> + Send + 'static) {
        let (best, _) = self.workers.least_loaded(self.next);
        self.next = best + 1;
        self.workers.spawn_on(best, connection);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Counts a connection on its thread until the connection ends.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Self(live)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Connections spread evenly and go back to their thread's count when
    /// they end; each runs on a `proxy-<n>` thread, not the caller's.
    #[tokio::test]
    async fn least_loaded_thread_takes_each_connection() {
        let mut workers = Workers::start(3).unwrap();
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..9 {
            let (stop, tx) = (stop.clone(), tx.clone());
            workers.spawn(async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send(name);
                stop.cancelled().await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..9 {
            names.push(rx.recv().await.unwrap().unwrap_or_default());
        }
        names.sort();
        assert_eq!(
            names,
            [
                "proxy-0", "proxy-0", "proxy-0", "proxy-1", "proxy-1", "proxy-1", "proxy-2",
                "proxy-2", "proxy-2"
            ]
        );
        let loads = |w: &Workers| -> Vec<usize> {
            w.workers
                .0
                .iter()
                .map(|w| w.live.load(Ordering::Relaxed))
                .collect()
        };
        assert_eq!(loads(&workers), [3, 3, 3]);
        stop.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while loads(&workers) != [0, 0, 0] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                loads(&workers)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A connection stays on the thread that accepted it while that thread
    /// is at most one connection above the least-loaded one, and goes to
    /// the least-loaded one beyond that.
    #[tokio::test]
    async fn an_accepting_thread_keeps_connections_until_it_is_the_busier() {
        let workers = Workers::start(2).unwrap();
        let pool = workers.pool();
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut names = Vec::new();
        // Thread 0 accepts four in a row: 0, 0 (one above), then 1, 0.
        for _ in 0..4 {
            let (stop, tx) = (stop.clone(), tx.clone());
            pool.spawn_near(0, async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
                stop.cancelled().await;
            });
            names.push(rx.recv().await.unwrap().unwrap_or_default());
        }
        assert_eq!(names, ["proxy-0", "proxy-0", "proxy-1", "proxy-0"]);
        stop.cancel();
    }

    /// The imbalance a thread keeps before it hands off grows with the
    /// load: one connection when the least-loaded thread serves fewer than
    /// eight, an eighth more above that.
    #[test]
    fn the_slack_is_one_connection_plus_an_eighth() {
        assert_eq!(slack(0), 1);
        assert_eq!(slack(7), 1);
        assert_eq!(slack(8), 2);
        assert_eq!(slack(16), 3);
        assert_eq!(slack(80), 11);
    }

    /// A task given to thread `i` runs there and its result comes back.
    #[tokio::test]
    async fn run_on_runs_on_the_named_thread() {
        let workers = Workers::start(2).unwrap();
        for i in 0..2 {
            let name = workers
                .run_on(i, async {
                    std::thread::current().name().map(str::to_owned)
                })
                .await
                .unwrap();
            assert_eq!(name.as_deref(), Some(format!("proxy-{i}").as_str()));
        }
    }

    /// Dropping the workers ends their threads and whatever still runs on
    /// them (the caller drops them only after the shutdown grace).
    #[tokio::test]
    async fn dropping_the_workers_ends_their_connections() {
        let mut workers = Workers::start(1).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        workers.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(workers);
        // The sender is dropped with the task: the receiver sees it closed.
        let r = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .unwrap();
        assert!(r.is_err());
    }
}
