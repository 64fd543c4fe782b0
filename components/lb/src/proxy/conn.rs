//! One client connection: choose and connect a backend (retrying elsewhere
//! on failure), then copy until both sides are done, the idle timer fires,
//! the backend's drain deadline passes or shutdown's grace is over.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::Shared;
use super::config::MAX_CONNECT_ATTEMPTS;
use super::copy::{Bidirectional, CopyError};
use crate::backends::{BackendStats, ConnectErrorKind};

/// Decrements the backend's active count however the connection ends.
struct Active(Arc<BackendStats>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    mut client: TcpStream,
    _permit: OwnedSemaphorePermit,
) {
    set_options(&client, &shared);
    let connected = tokio::select! {
        biased;
        () = shared.force_close.cancelled() => return,
        c = connect_some_backend(&shared) => c,
    };
    let Some((mut backend, stats, close)) = connected else {
        // Nothing could be reached: reset rather than close, so the client
        // fails at once instead of waiting for a TLS handshake that will
        // never come.
        let _ = client.set_zero_linger();
        return;
    };
    let active = Active(stats);

    let config = &shared.config;
    #[cfg(target_os = "linux")]
    if config.splice {
        match super::splice::Splice::new(&mut client, &mut backend, &active.0) {
            Ok(copy) => {
                run(copy, &shared, &close).await;
                return;
            }
            Err(e) => {
                // No pipes (descriptor limit): the buffered copy still works.
                tracing::debug!(error = %e, "splice unavailable; copying through buffers");
            }
        }
    }
    let copy = Bidirectional::new(&mut client, &mut backend, &active.0, config.buffer_size);
    run(copy, &shared, &close).await;
}

/// The copy future the connection drives (buffered or spliced).
pub(super) trait Forward:
    std::future::Future<Output = Result<(), CopyError>> + Unpin
{
    /// Whether bytes moved since the last call.
    fn take_activity(&mut self) -> bool;
    /// Resets the peer of the side that failed, so it learns the
    /// connection broke instead of seeing a clean end of stream.
    fn reset_peer_of(&mut self, failed: &CopyError);
}

async fn run<C: Forward>(
    mut copy: C,
    shared: &Shared,
    close: &tokio_util::sync::CancellationToken,
) {
    let idle = shared.config.idle_timeout;
    // Without an idle timeout the timer is never polled (the `if` below),
    // so it costs nothing; with one, it is re-armed once per period, not
    // on every chunk.
    let sleep = tokio::time::sleep(idle.unwrap_or(Duration::MAX / 4));
    tokio::pin!(sleep);
    let force = shared.force_close.cancelled();
    tokio::pin!(force);
    let drain = close.cancelled();
    tokio::pin!(drain);
    loop {
        tokio::select! {
            biased;
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                    copy.reset_peer_of(&e);
                }
                return;
            }
            () = &mut force => {
                tracing::debug!("closing connection: shutdown grace over");
                return;
            }
            () = &mut drain => {
                tracing::debug!("closing connection: backend drain deadline passed");
                return;
            }
            () = &mut sleep, if idle.is_some() => {
                if copy.take_activity() {
                    if let Some(idle) = idle {
                        sleep.as_mut().reset(Instant::now() + idle);
                    }
                } else {
                    tracing::debug!(?idle, "closing idle connection");
                    return;
                }
            }
        }
    }
}

impl Forward for Bidirectional<'_> {
    fn take_activity(&mut self) -> bool {
        Bidirectional::take_activity(self)
    }
    fn reset_peer_of(&mut self, failed: &CopyError) {
        Bidirectional::reset_peer_of(self, failed);
    }
}

/// Tries backends until one accepts, at most `connectAttempts` of them,
/// never the same one twice. Returns the stream, the backend's counters
/// (its active count already includes this connection) and its close token.
async fn connect_some_backend(
    shared: &Shared,
) -> Option<(
    TcpStream,
    Arc<BackendStats>,
    tokio_util::sync::CancellationToken,
)> {
    let config = &shared.config;
    // One snapshot for all attempts, so indices stay meaningful.
    let set = shared.backends.load();
    let mut tried = [0usize; MAX_CONNECT_ATTEMPTS as usize];
    let attempts = (config.connect_attempts as usize).min(tried.len());
    for n in 0..attempts {
        let Some(backend) = set.pick(&tried[..n]) else {
            if n == 0 {
                shared.metrics.no_backend.increment(1);
                tracing::warn!(
                    version = set.version(),
                    "no backend available for a new connection"
                );
            } else {
                shared.metrics.all_attempts_failed.increment(1);
                tracing::warn!(attempts = n, "every eligible backend failed to connect");
            }
            return None;
        };
        tried[n] = backend.index();
        let stats = backend.stats();
        // Reserve before connecting so concurrent picks see this load.
        stats.reserve();
        if n > 0 {
            stats.retried();
            shared.metrics.retries.increment(1);
        }
        let result = tokio::time::timeout(
            config.connect_timeout,
            TcpStream::connect(backend.address()),
        )
        .await;
        let error = match result {
            Ok(Ok(stream)) => {
                stats.confirm();
                set_options(&stream, shared);
                return Some((stream, stats.clone(), backend.close_token().clone()));
            }
            Ok(Err(e)) => e,
            Err(_) => io::ErrorKind::TimedOut.into(),
        };
        stats.release();
        let kind = ConnectErrorKind::of(&error);
        stats.connect_failed(kind);
        tracing::debug!(
            backend = backend.id(),
            address = %backend.address(),
            reason = kind.as_str(),
            error = %error,
            "connect failed; trying another backend"
        );
    }
    shared.metrics.all_attempts_failed.increment(1);
    tracing::warn!(attempts, "every connect attempt failed");
    None
}

/// Latency first (the apiserver's requests are small and interactive), and
/// keepalive so a vanished peer does not pin a connection forever. Failures
/// only lose an optimisation, so they are not fatal.
fn set_options(stream: &TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    if let Some(ka) = &shared.keepalive {
        let _ = socket2::SockRef::from(stream).set_tcp_keepalive(ka);
    }
}
