//! The L4 data path: accept a client, pick a backend, connect (retrying on
//! another backend before the client sees anything, racing a second one
//! beside a connect that hangs; replaying the client's
//! first bytes elsewhere when a backend accepts but dies before answering),
//! then copy bytes both ways without looking at them. TLS passes through untouched, so clients
//! see the apiserver's own certificate.
//!
//! The caller binds the listener ([`serve`] takes it): the VIP holder's
//! front, the node-local listener (e.g. `127.0.0.1:7445`) and tests on port
//! 0 all run the same code.
//!
//! Linux only, like the rest of bulwark (static pods, netlink, splice).
//!
//! Wiring, as the `bulwark-lb` binary does it:
//!
//! ```ignore
//! bulwark_common::telemetry::metrics_handle(); // before serve: handles resolve once
//! let backends = Backends::new(config.routing_policy());   // this node's zone
//! // Raft apply / health aggregation, on every change (version = log index):
//! backends.publish(specs, applied_index)?;
//! let proxy = Arc::new(config.proxy.clone());
//! let local = TcpListener::bind("127.0.0.1:7445").await?;
//! // Each listener gets a handle with its own routing mode.
//! let b = backends.with_mode(config.routing.local);
//! let (p, t) = (proxy.clone(), shutdown.token());
//! shutdown.spawn_critical("proxy-local", async move { Ok(proxy::serve(local, b, p, t).await?) });
//! // The VIP front (`serve_vip`): bind when this node takes the VIP, cancel
//! // a child token when it releases it (new connections stop at once and
//! // open ones are reset, so their clients reconnect to the new holder).
//! // arp and bgp mode keep the front listener for good (`serve_front`):
//! // the actuator opens its `FrontGate` before adding the address and
//! // closes it (resetting the holding's connections) before deleting it.
//! ```

mod buffers;
mod close;
mod config;
mod conn;
mod connect;
mod copy;
mod gate;
mod listeners;
mod splice;
mod workers;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::Backends;
use workers::Workers;

pub use config::{KeepaliveConfig, MAX_CONNECT_ATTEMPTS, ProxyConfig};
pub use gate::{Closed, FrontGate};

/// Why [`serve`] stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listener itself is broken (closed descriptor, not a socket):
    /// accepting again cannot succeed.
    #[error("listener on {address} failed: {source}")]
    Listener {
        /// The listener's address, when it could still be read.
        address: String,
        /// The error from `accept`.
        source: io::Error,
    },
    /// The data-path threads could not be started.
    #[error("cannot start the data-path threads for {address}: {source}")]
    Workers {
        /// The listener's address.
        address: String,
        /// Why a thread or its runtime could not be created.
        source: io::Error,
    },
}

/// Metric handles resolved once per listener, not per connection.
struct Metrics {
    accepted: Counter,
    accept_errors_resources: Counter,
    accept_errors_other: Counter,
    max_connections_reached: Counter,
    retries: Counter,
    hedges: Counter,
    replays: Counter,
    no_backend: Counter,
    all_attempts_failed: Counter,
}

impl Metrics {
    fn new(listener: &str) -> Self {
        let l = listener.to_owned();
        Self {
            accepted: metrics::counter!("bulwark_lb_connections_accepted_total", "listener" => l.clone()),
            accept_errors_resources: metrics::counter!("bulwark_lb_accept_errors_total", "listener" => l.clone(), "reason" => "resources"),
            accept_errors_other: metrics::counter!("bulwark_lb_accept_errors_total", "listener" => l.clone(), "reason" => "other"),
            max_connections_reached: metrics::counter!("bulwark_lb_max_connections_reached_total", "listener" => l.clone()),
            retries: metrics::counter!("bulwark_lb_retries_total", "listener" => l.clone()),
            hedges: metrics::counter!("bulwark_lb_connect_hedges_total", "listener" => l.clone()),
            replays: metrics::counter!("bulwark_lb_first_flight_replays_total", "listener" => l.clone()),
            no_backend: metrics::counter!("bulwark_lb_connections_failed_total", "listener" => l.clone(), "reason" => "no_backend"),
            all_attempts_failed: metrics::counter!("bulwark_lb_connections_failed_total", "listener" => l, "reason" => "connect_failed"),
        }
    }
}

/// Which kind of listener [`serve_until`] runs.
enum Front {
    /// [`serve`]: the node-local listener, tests.
    Plain,
    /// [`serve_vip`]: bind mode's front, served while held.
    Vip,
    /// [`serve_front`]: arp and bgp mode's front, kept for good.
    Gated(FrontGate),
}

/// What every connection task of one listener shares.
struct Shared {
    /// Close client connections with a reset when their close token fires
    /// ([`serve_vip`], [`serve_front`]), not with a FIN.
    reset_on_close: bool,
    /// arp and bgp mode: accept only while the VIP is held.
    gate: Option<FrontGate>,
    backends: Backends,
    config: Arc<ProxyConfig>,
    keepalive: Option<socket2::TcpKeepalive>,
    /// Client sockets got their options from the listener.
    client_options_inherited: bool,
    /// Cancelled when the shutdown grace is over: open connections close.
    force_close: CancellationToken,
    metrics: Metrics,
    /// A gated front's own address (VIP:port), for its client table.
    front_address: Option<std::net::SocketAddr>,
}

/// Serves `listener` until `shutdown` is cancelled: stops accepting at
/// once, lets open connections finish for `shutdownGrace`, then closes the
/// rest and returns. Errors only when the listener itself is unusable or
/// the data-path threads cannot start.
///
/// The connections run on `proxy.workers` threads of their own
/// ([`workers`]), each accepting on its own listener on the same address
/// ([`listeners`]), which stop when this returns (or its future is
/// dropped, which closes open connections).
///
/// Metric handles are resolved here: install the metrics recorder
/// (`bulwark_common::telemetry::metrics_handle()`) before calling it.
pub async fn serve(
    listener: TcpListener,
    backends: Backends,
    config: Arc<ProxyConfig>,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    serve_until(listener, backends, config, shutdown, Front::Plain).await
}

/// [`serve`] for a VIP front: when `released` is cancelled (the VIP went
/// to another node, whatever the reason), accepting stops and every open
/// connection is reset at once, without `shutdownGrace`. The VIP's clients
/// then reconnect, to the new holder, at once instead of waiting for their
/// own timeouts (a watch can sit silent for minutes) on a node that no
/// longer holds the VIP.
pub async fn serve_vip(
    listener: TcpListener,
    backends: Backends,
    config: Arc<ProxyConfig>,
    released: CancellationToken,
) -> Result<(), ProxyError> {
    serve_until(listener, backends, config, released, Front::Vip).await
}

/// [`serve`] for the front listener of arp and bgp mode, which every node
/// keeps on VIP:port for its whole life: connections are accepted only
/// while `gate` is open (this node holds the VIP), and closing the gate
/// resets those of the holding at once ([`FrontGate`]). On `shutdown` it
/// ends like [`serve`], with `shutdownGrace` (the VIP task's release on
/// shutdown has normally reset them already).
pub async fn serve_front(
    listener: TcpListener,
    backends: Backends,
    config: Arc<ProxyConfig>,
    shutdown: CancellationToken,
    gate: FrontGate,
) -> Result<(), ProxyError> {
    serve_until(listener, backends, config, shutdown, Front::Gated(gate)).await
}

/// How a front is served: a listener per data-path thread (one
/// `SO_REUSEPORT` group), or one acceptor handing connections over.
enum Listening {
    PerThread(Vec<std::net::TcpListener>),
    HandOff(std::net::TcpListener),
}

async fn serve_until(
    listener: TcpListener,
    backends: Backends,
    config: Arc<ProxyConfig>,
    shutdown: CancellationToken,
    front: Front,
) -> Result<(), ProxyError> {
    let local = listener.local_addr().ok();
    let address = local.map_or_else(|| "?".into(), |a| a.to_string());
    backends.set_drain_max_duration(config.drain_max_duration);
    check_descriptor_limit(&address, &config);
    let keepalive = config.tcp_keepalive.enabled.then(|| {
        socket2::TcpKeepalive::new()
            .with_time(config.tcp_keepalive.idle)
            .with_interval(config.tcp_keepalive.interval)
            .with_retries(config.tcp_keepalive.count)
    });
    // Accepted sockets inherit TCP_NODELAY and the keepalive settings from
    // the listener on Linux: set once here instead of five setsockopt calls
    // per accepted connection. If that fails, set them per connection.
    let inherit = set_listener_options(&listener, keepalive.as_ref()).is_ok();
    let count = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    let mut workers = Workers::start(count).map_err(|source| ProxyError::Workers {
        address: address.clone(),
        source,
    })?;
    let listener = listener.into_std().map_err(|source| ProxyError::Listener {
        address: address.clone(),
        source,
    })?;
    // bind mode's front must refuse new connects the moment it is
    // released: its holder shuts the one listening socket down there and
    // then (vip/bind.rs), which sibling listeners in a reuseport group,
    // closed only when their threads next run, would outlive. It keeps one
    // acceptor.
    let listening = if matches!(front, Front::Vip) {
        Listening::HandOff(listener)
    } else {
        match listeners::per_thread(listener, workers.len()) {
            Ok(all) => Listening::PerThread(all),
            Err((one, e)) => {
                tracing::warn!(listener = %address, error = %e, "cannot open a listener per data-path thread; one acceptor hands connections to the threads");
                Listening::HandOff(one)
            }
        }
    };
    let inherit = inherit
        && match &listening {
            Listening::PerThread(all) => all[1..]
                .iter()
                .all(|l| set_listener_options(l, keepalive.as_ref()).is_ok()),
            Listening::HandOff(_) => true,
        };
    let per_thread = matches!(listening, Listening::PerThread(_));
    // Resets on release, and on shutdown a grace first: bind mode's front
    // only serves while held, so its shutdown is a release.
    let (reset_on_close, grace_on_shutdown) = match front {
        Front::Plain => (false, true),
        Front::Vip => (true, false),
        Front::Gated(_) => (true, true),
    };
    let gate = match front {
        Front::Gated(g) => Some(g),
        Front::Plain | Front::Vip => None,
    };
    let shared = Arc::new(Shared {
        reset_on_close,
        backends,
        client_options_inherited: inherit,
        keepalive,
        force_close: gate
            .as_ref()
            .map_or_else(CancellationToken::new, FrontGate::root),
        front_address: gate.as_ref().and(local),
        gate,
        metrics: Metrics::new(&address),
        config,
    });
    let limit = Arc::new(Semaphore::new(shared.config.max_connections as usize));
    let tracker = TaskTracker::new();
    tracing::info!(listener = %address, threads = workers.len(), per_thread, routing = shared.backends.mode().as_str(), "proxy listening");

    let accepting = Accepting {
        address: &address,
        shared: &shared,
        limit: &limit,
        tracker: &tracker,
        shutdown: &shutdown,
    };
    // Each loop drops its listener when it returns: the kernel refuses new
    // connects from then on instead of queueing them for a listener
    // nobody reads.
    let result = match listening {
        Listening::PerThread(all) => accepting.on_every_thread(all, &workers).await,
        Listening::HandOff(one) => accepting.handing_off(one, &mut workers).await,
    };

    tracker.close();
    if !grace_on_shutdown {
        tracing::info!(listener = %address, open = tracker.len(), "VIP released: resetting open connections");
        shared.force_close.cancel();
        tracker.wait().await;
    } else if !tracker.is_empty() {
        let grace = shared.config.shutdown_grace;
        tracing::info!(listener = %address, open = tracker.len(), ?grace, "waiting for open connections");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::info!(listener = %address, open = tracker.len(), "grace over: closing connections");
            shared.force_close.cancel();
            tracker.wait().await;
        }
    }
    tracing::info!(listener = %address, "proxy stopped");
    result
}

/// Warns when `maxConnections` cannot be reached before accept runs out of
/// descriptors: each connection holds two sockets, plus two pipes per bulk
/// direction with splice. The accept backoff copes either way; the warning
/// says which limit will bite first.
fn check_descriptor_limit(address: &str, config: &ProxyConfig) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let per_connection: u64 = if config.splice { 6 } else { 2 };
    let needed = u64::from(config.max_connections) * per_connection + 64;
    if limit.rlim_cur < needed {
        tracing::warn!(
            listener = address,
            max_connections = config.max_connections,
            descriptor_limit = limit.rlim_cur,
            needed,
            "the descriptor limit (ulimit -n) is below what maxConnections needs: accepts will back off first"
        );
    }
}

fn set_listener_options(
    listener: &impl std::os::fd::AsFd,
    keepalive: Option<&socket2::TcpKeepalive>,
) -> io::Result<()> {
    let sock = socket2::SockRef::from(listener);
    sock.set_tcp_nodelay(true)?;
    if let Some(ka) = keepalive {
        sock.set_tcp_keepalive(ka)?;
    }
    Ok(())
}

/// Registers a listener with the current thread's runtime, for readiness
/// only: accepted sockets are registered by the thread that serves them.
fn register(l: std::net::TcpListener) -> io::Result<AsyncFd<std::net::TcpListener>> {
    // SAFETY: the std listener owns its descriptor, and the AsyncFd owns
    // the listener until it is dropped, so the descriptor stays open and
    // the same for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// Accepts one connection, with the client's address (which the kernel
/// hands over with the accept: no extra call).
fn accept_nonblocking(
    listener: &std::net::TcpListener,
) -> io::Result<(std::net::TcpStream, Option<std::net::SocketAddr>)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: the listener's descriptor is open for the call (we borrow
    // the listener), and `try_init` passes a storage and its length that
    // accept4 may fill.
    let (fd, peer) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                listener.as_raw_fd(),
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })
    }?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    Ok((stream, peer.as_socket()))
}

/// A connection's whole life on its data-path thread.
/// `close` is the connection's close token: the listener's `force_close`,
/// or a gated front's holding's.
async fn connection(
    shared: Arc<Shared>,
    client: std::net::TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
    close: CancellationToken,
) {
    let client = match TcpStream::from_std(client) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register an accepted connection; closing it");
            return;
        }
    };
    conn::handle(shared, client, permit, close).await;
}

/// What every accept loop of one listener address shares.
struct Accepting<'a> {
    address: &'a str,
    shared: &'a Arc<Shared>,
    limit: &'a Arc<Semaphore>,
    tracker: &'a TaskTracker,
    shutdown: &'a CancellationToken,
}

impl Accepting<'_> {
    /// One accept loop per data-path thread, each on its own listener and
    /// serving what it accepts. A listener that fails stops all of them.
    async fn on_every_thread(
        &self,
        listeners: Vec<std::net::TcpListener>,
        workers: &Workers,
    ) -> Result<(), ProxyError> {
        let stop = self.shutdown.child_token();
        let loops: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let (address, shared) = (self.address.to_owned(), self.shared.clone());
                let (limit, tracker) = (self.limit.clone(), self.tracker.clone());
                let stop = stop.clone();
                let pool = workers.pool();
                workers.run_on(i, async move {
                    let listener = register(l).map_err(|source| ProxyError::Listener {
                        address: address.clone(),
                        source,
                    });
                    let result = match listener {
                        Ok(l) => {
                            let mut here = Spawner::Here(pool, i);
                            accept_loop(&l, &address, &shared, &limit, &tracker, &mut here, &stop)
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    if result.is_err() {
                        stop.cancel();
                    }
                    result
                })
            })
            .collect();
        let mut result = Ok(());
        for l in loops {
            let r = l.await.unwrap_or_else(|e| {
                Err(ProxyError::Listener {
                    address: self.address.to_owned(),
                    source: io::Error::other(e),
                })
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// One accept loop on the caller's runtime, handing each connection to
    /// the least-loaded thread: the fallback when the per-thread listeners
    /// cannot be opened.
    async fn handing_off(
        &self,
        listener: std::net::TcpListener,
        workers: &mut Workers,
    ) -> Result<(), ProxyError> {
        let l = register(listener).map_err(|source| ProxyError::Listener {
            address: self.address.to_owned(),
            source,
        })?;
        accept_loop(
            &l,
            self.address,
            self.shared,
            self.limit,
            self.tracker,
            &mut Spawner::HandOff(workers),
            self.shutdown,
        )
        .await
    }
}

/// Where an accepted connection runs.
enum Spawner<'a> {
    /// On the accepting data-path thread (the pool's thread `usize`), or
    /// on the least-loaded one when it is the busier.
    Here(workers::Pool, usize),
    /// On the least-loaded data-path thread.
    HandOff(&'a mut Workers),
}

impl Spawner<'_> {
    fn spawn(&mut self, connection: impl std::future::Future<Output = ()> + Send + 'static) {
        match self {
            Spawner::Here(pool, i) => pool.spawn_near(*i, connection),
            Spawner::HandOff(workers) => workers.spawn(connection),
        }
    }
}

/// Accepts until `shutdown`. A connection is waited for before a
/// connection slot (`maxConnections`): with a listener per thread, a slot
/// held by a loop whose queue is empty would be one that a client queued
/// on another thread's listener could not get.
async fn accept_loop(
    listener: &AsyncFd<std::net::TcpListener>,
    address: &str,
    shared: &Arc<Shared>,
    limit: &Arc<Semaphore>,
    tracker: &TaskTracker,
    spawner: &mut Spawner<'_>,
    shutdown: &CancellationToken,
) -> Result<(), ProxyError> {
    let mut backoff = Backoff::default();
    let mut at_limit = false;
    loop {
        if let Some(gate) = &shared.gate
            && !gate.is_open()
        {
            // Not holding the VIP: leave new connections in the kernel's
            // queue for the next holding.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                () = gate.opened() => {}
            }
        }
        let ready = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            // Released while waiting: wait for the next holding instead.
            () = until_closed(shared.gate.as_ref()) => continue,
            r = listener.readable() => r,
        };
        let mut ready = ready.map_err(|source| ProxyError::Listener {
            address: address.to_owned(),
            source,
        })?;
        let Some(permit) = slot(address, shared, limit, &mut at_limit, shutdown).await else {
            return Ok(());
        };
        if shared.gate.as_ref().is_some_and(|g| !g.is_open()) {
            // Released while waiting for a slot.
            continue;
        }
        let Ok(accepted) = ready.try_io(|l| accept_nonblocking(l.get_ref())) else {
            // Nothing queued after all: the slot goes back.
            continue;
        };
        match accepted {
            Ok((client, peer)) => {
                backoff.recovered(address);
                shared.metrics.accepted.increment(1);
                spawn_connection(shared, tracker, spawner, (client, peer), permit);
            }
            Err(e) => match classify_accept_error(&e) {
                AcceptError::Connection => {}
                AcceptError::Resources => {
                    shared.metrics.accept_errors_resources.increment(1);
                    let pause = backoff.next(address, &e);
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                AcceptError::Fatal => {
                    shared.metrics.accept_errors_other.increment(1);
                    return Err(ProxyError::Listener {
                        address: address.to_owned(),
                        source: e,
                    });
                }
            },
        }
    }
}

/// A connection slot, waiting for one while `maxConnections` are open
/// (the client waits in the accept queue); `None` on shutdown.
async fn slot(
    address: &str,
    shared: &Shared,
    limit: &Arc<Semaphore>,
    at_limit: &mut bool,
    shutdown: &CancellationToken,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(p) = limit.clone().try_acquire_owned() {
        *at_limit = false;
        return Some(p);
    }
    if !*at_limit {
        *at_limit = true;
        shared.metrics.max_connections_reached.increment(1);
        tracing::warn!(
            listener = address,
            max = shared.config.max_connections,
            "max connections reached: new clients wait in the accept queue"
        );
    }
    tokio::select! {
        biased;
        () = shutdown.cancelled() => None,
        // The semaphore is never closed.
        p = limit.clone().acquire_owned() => p.ok(),
    }
}

/// Resolves when a gated front's gate closes; never for other listeners.
async fn until_closed(gate: Option<&FrontGate>) {
    match gate {
        Some(g) => g.closed().await,
        None => std::future::pending().await,
    }
}

/// Hands an accepted client to a data-path thread, under the current
/// holding of a gated front, in the gate's client table while it is open;
/// a gated front that stopped holding the VIP while the accept was under
/// way resets it instead, while the address may still be there to send the
/// reset from.
fn spawn_connection(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    workers: &mut Spawner<'_>,
    (client, peer): (std::net::TcpStream, Option<std::net::SocketAddr>),
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let Some(gate) = &shared.gate else {
        let close = shared.force_close.clone();
        workers.spawn(tracker.track_future(connection(shared.clone(), client, permit, close)));
        return;
    };
    match gate.holding() {
        Some(h) => {
            // With a client table, one insert here and one remove when the
            // task ends, on one of its shards: nothing else on the data path.
            let registered = gate
                .clients()
                .zip(peer)
                .zip(shared.front_address)
                .map(|((table, client), vip)| table.register(crate::clients::Flow { client, vip }));
            let conn = connection(shared.clone(), client, permit, h.close);
            let conn = async move {
                conn.await;
                drop(registered);
            };
            workers.spawn(tracker.track_future(h.tracker.track_future(conn)));
        }
        None => {
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        }
    }
}

enum AcceptError {
    /// One pending connection failed (aborted before we accepted it): skip it.
    Connection,
    /// Out of descriptors or memory: accepting again at once would spin.
    Resources,
    /// The listener is unusable.
    Fatal,
}

fn classify_accept_error(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Resources,
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT) => {
            AcceptError::Fatal
        }
        // ECONNABORTED, EPROTO, EPERM (firewall), ENETDOWN and friends
        // concern the one connection, not the listener.
        _ => AcceptError::Connection,
    }
}

/// Exponential pause after resource errors, logged once per burst.
#[derive(Default)]
struct Backoff {
    errors: u64,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_millis(500);

    fn next(&mut self, address: &str, e: &io::Error) -> Duration {
        if self.errors == 0 {
            tracing::error!(
                listener = address,
                error = %e,
                "accept failed for lack of resources (descriptors or memory); backing off"
            );
        }
        self.errors += 1;
        let shift = (self.errors - 1).min(7) as u32;
        (Self::FIRST * 2u32.pow(shift)).min(Self::MAX)
    }

    fn recovered(&mut self, address: &str) {
        if self.errors > 0 {
            tracing::info!(
                listener = address,
                errors = self.errors,
                "accepting again after resource errors"
            );
            self.errors = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_are_classified_by_what_retrying_would_do() {
        let os = io::Error::from_raw_os_error;
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(matches!(
                classify_accept_error(&os(e)),
                AcceptError::Resources
            ));
        }
        for e in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM, libc::EINTR] {
            assert!(matches!(
                classify_accept_error(&os(e)),
                AcceptError::Connection
            ));
        }
        for e in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK] {
            assert!(matches!(classify_accept_error(&os(e)), AcceptError::Fatal));
        }
    }

    #[test]
    fn resource_backoff_grows_caps_and_resets() {
        let mut b = Backoff::default();
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<Duration> = (0..10).map(|_| b.next("test", &e)).collect();
        assert_eq!(pauses[0], Duration::from_millis(5));
        assert_eq!(pauses[1], Duration::from_millis(10));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), Duration::from_millis(500));
        // A burst of a second never makes more than a dozen accept calls.
        let mut b = Backoff::default();
        let mut spent = Duration::ZERO;
        let mut calls = 0;
        while spent < Duration::from_secs(1) {
            spent += b.next("test", &e);
            calls += 1;
        }
        assert!(calls <= 12, "{calls} accept calls in a second");
        b.recovered("test");
        assert_eq!(b.next("test", &e), Duration::from_millis(5));
    }

    /// The per-connection setsockopt calls are skipped on this premise.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listener_options() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(17))
            .with_interval(Duration::from_secs(5))
            .with_retries(4);
        set_listener_options(&listener, Some(&ka)).unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let s = socket2::SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(17));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(5));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
    }
}
