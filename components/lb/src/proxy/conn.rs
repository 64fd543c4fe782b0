//! One client connection: choose and connect a backend ([`super::connect`]:
//! retrying elsewhere on failure, racing another beside a hung connect), then copy until both sides are done, the idle timer fires,
//! the backend's drain deadline passes or shutdown's grace is over. A
//! backend that closes or resets before its first byte gets the client's
//! first flight replayed to another backend ([`super::copy`] keeps it).
//!
//! A client that arrives while this node has no backend to offer at all
//! waits for the backend set to change, up to one connect timeout from
//! its arrival, before it is reset. That is the moment a new cluster's
//! nodes are in until the leader's seeding of the configured backends is
//! committed (on a loaded machine, hundreds of milliseconds after the
//! election, while the node-local listeners already accept): resetting
//! at once turned every node's first client connections into failures.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::close::{CloseReason, CloseSignals};
use super::connect::{Connected, Tried, connect_some_backend};
use super::copy::{Bidirectional, CopyError};
use crate::backends::{BackendStats, ConnectErrorKind};

/// Decrements the backend's active count however the connection ends.
struct Active(Arc<BackendStats>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// `force_close` closes the connection from outside (shutdown grace over,
/// or the VIP released): with a reset when the listener says so.
pub(super) async fn handle(
    shared: Arc<Shared>,
    mut client: TcpStream,
    _permit: OwnedSemaphorePermit,
    force_close: CancellationToken,
) {
    if !shared.client_options_inherited {
        set_options(&client, &shared);
    }
    // Replays of the first flight must come within one connect timeout of
    // the client's arrival: the bound on how long a client waits for them.
    let replay_until = Instant::now() + shared.config.connect_timeout;
    let mut tried = Tried::default();
    let connected = tokio::select! {
        biased;
        () = force_close.cancelled() => {
            if shared.reset_on_close {
                let _ = client.set_zero_linger();
            }
            return;
        }
        c = connect_some_backend(&shared, &mut tried, replay_until) => c,
    };
    let Some(Connected {
        stream: backend,
        stats,
        mut close,
    }) = connected
    else {
        // Nothing could be reached: reset rather than close, so the client
        // fails at once instead of waiting for a TLS handshake that will
        // never come.
        let _ = client.set_zero_linger();
        return;
    };
    let mut active = Active(stats.clone());

    let config = &shared.config;
    let mut copy = Bidirectional::new(
        &mut client,
        backend,
        stats,
        config.buffer_size,
        config.splice,
        replay_until,
    );
    while let Some(failed) = run(&mut copy, &shared, &force_close, &close).await {
        active.0.connect_failed(ConnectErrorKind::of(&failed));
        tracing::debug!(
            error = %failed,
            tried = tried.len(),
            "backend closed before its first byte; replaying the client's first flight to another backend"
        );
        let next = tokio::select! {
            biased;
            () = force_close.cancelled() => {
                if shared.reset_on_close {
                    copy.reset_client();
                }
                return;
            }
            c = connect_some_backend(&shared, &mut tried, replay_until) => c,
        };
        let Some(Connected {
            stream: backend,
            stats,
            close: token,
        }) = next
        else {
            copy.reset_peer_of(&CopyError::BeforeFirstByte(failed));
            return;
        };
        // The failed backend's connection ends here (its drop counts it).
        active = Active(stats.clone());
        close = token;
        copy.replay_to(backend, stats);
        shared.metrics.replays.increment(1);
    }
}

/// Copies until the connection is over (`None`), or until the backend
/// failed before its first byte while the first flight can be replayed
/// (`Some`, with the backend's error).
async fn run(
    copy: &mut Bidirectional<'_>,
    shared: &Shared,
    force_close: &CancellationToken,
    close: &CancellationToken,
) -> Option<io::Error> {
    let idle = shared.config.idle_timeout;
    // Without an idle timeout the timer is never polled (the `if` below),
    // so it costs nothing; with one, it is re-armed once per period, not
    // on every chunk.
    let sleep = tokio::time::sleep(idle.unwrap_or(Duration::MAX / 4));
    tokio::pin!(sleep);
    let force = force_close.cancelled();
    tokio::pin!(force);
    let drain = close.cancelled();
    tokio::pin!(drain);
    let mut signals = CloseSignals::new(force, drain);
    loop {
        tokio::select! {
            biased;
            r = &mut *copy => {
                match r {
                    Ok(()) => {}
                    Err(CopyError::BeforeFirstByte(e)) => return Some(e),
                    Err(e) => {
                        tracing::debug!(error = %e, "connection ended with an error");
                        copy.reset_peer_of(&e);
                    }
                }
                return None;
            }
            reason = &mut signals => {
                tracing::debug!(?reason, "closing connection");
                if reason == CloseReason::Shutdown && shared.reset_on_close {
                    copy.reset_client();
                }
                return None;
            }
            () = &mut sleep, if idle.is_some() => {
                if copy.take_activity() {
                    if let Some(idle) = idle {
                        sleep.as_mut().reset(Instant::now() + idle);
                    }
                } else {
                    tracing::debug!(?idle, "closing idle connection");
                    return None;
                }
            }
        }
    }
}

/// Latency first (the apiserver's requests are small and interactive), and
/// keepalive so a vanished peer does not pin a connection forever. Failures
/// only lose an optimisation, so they are not fatal.
pub(super) fn set_options(stream: &TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    if let Some(ka) = &shared.keepalive {
        let _ = socket2::SockRef::from(stream).set_tcp_keepalive(ka);
    }
}
