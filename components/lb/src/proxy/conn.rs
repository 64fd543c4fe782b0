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
use super::close::CloseSignals;
use super::config::MAX_CONNECT_ATTEMPTS;
use super::copy::Bidirectional;
use crate::backends::{BackendStats, ConnectErrorKind};

/// A slot reserved on a backend while connecting; released unless the
/// connect succeeded, including when the attempt is dropped by shutdown.
struct Reservation<'a>(Option<&'a BackendStats>);

impl Reservation<'_> {
    fn confirm(mut self) {
        if let Some(s) = self.0.take() {
            s.confirm();
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.release();
        }
    }
}

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
    if !shared.client_options_inherited {
        set_options(&client, &shared);
    }
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
    let copy = Bidirectional::new(
        &mut client,
        &mut backend,
        &active.0,
        config.buffer_size,
        config.splice,
    );
    run(copy, &shared, &close).await;
}

async fn run(
    mut copy: Bidirectional<'_>,
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
    let mut signals = CloseSignals::new(force, drain);
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
            reason = &mut signals => {
                tracing::debug!(?reason, "closing connection");
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
    let mode = shared.backends.mode();
    let mut tried = [0usize; MAX_CONNECT_ATTEMPTS as usize];
    let attempts = (config.connect_attempts as usize).min(tried.len());
    for n in 0..attempts {
        let Some(backend) = set.pick(mode, &tried[..n]) else {
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
        let reservation = Reservation(Some(stats));
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
                reservation.confirm();
                set_options(&stream, shared);
                return Some((stream, stats.clone(), backend.close_token().clone()));
            }
            Ok(Err(e)) => e,
            Err(_) => io::ErrorKind::TimedOut.into(),
        };
        drop(reservation);
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
