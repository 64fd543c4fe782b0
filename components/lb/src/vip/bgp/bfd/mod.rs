//! BFD (RFC 5880 asynchronous mode, RFC 5881 single hop) beside each BGP
//! session, so a router running BFD drops a dead holder's route within
//! its BFD detection time instead of its BGP hold timer, and our side
//! tears down a BGP session whose path went dark.
//!
//! - [`packet`]: the control packet, its strict decoder, the GTSM check.
//! - [`machine`]: the Down/Init/Up state machine and its timers (pure).
//! - [`socket`]: the UDP 3784 listener (with each datagram's TTL) and the
//!   per-session sender (TTL 255, source port 49152–65535).
//! - [`session`]: the task that runs one peer's machine on those sockets.
//!
//! A [`Hub`] collects the sessions of a speaker and owns the listeners,
//! one per family in use: a datagram is accepted only with TTL 255, only
//! from a configured peer's address, and handed to that peer's session.
//!
//! No maintained crate on crates.io fits (the Rust BFD crates are
//! unmaintained packet parsers or daemons, not a library one embeds
//! beside a BGP session), hence this small one, fuzzed like the BGP
//! decoder (fuzz/fuzz_targets/bfd.rs).
//!
//! BFD only ever takes a session *down*: it never makes a node announce,
//! so the fencing argument of docs/FAILOVER.md is untouched.

pub mod machine;
pub mod packet;
pub mod session;
pub mod socket;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use self::machine::Timers;
use self::packet::{Diag, Packet, State};

/// How long a listener that could not bind waits before trying again.
const REBIND: Duration = Duration::from_secs(1);

/// A state change as the status RPC shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    /// When.
    pub at: SystemTime,
    /// From.
    pub from: State,
    /// To.
    pub to: State,
    /// Our diagnostic after it (why we went down, if we did).
    pub diag: Diag,
}

/// One peer's BFD session as `bulwarkctl lb status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BfdStatus {
    /// Our state.
    pub state: State,
    /// The peer's, as it last said.
    pub remote_state: State,
    /// The last change.
    pub last_change: Option<StateChange>,
    /// Times the session left Up; the BGP session watches this count (a
    /// watch may skip an Up → Down → Up it did not see in between).
    pub downs: u64,
    /// The agreed detection time (zero until the peer was heard).
    pub detection_time: Duration,
    /// Why the listener or sender is not working, if it is not.
    pub error: Option<String>,
}

/// Routes datagrams to sessions: the peer's address → its session.
type Routes = HashMap<IpAddr, mpsc::Sender<Packet>>;

/// Collects a speaker's BFD sessions, then runs their listeners.
pub struct Hub {
    listen_port: u16,
    peer_port: u16,
    routes: Routes,
    statuses: Vec<watch::Sender<BfdStatus>>,
}

impl Hub {
    /// A hub listening on `listen_port` and sending to `peer_port` (both
    /// [`socket::PORT`] outside tests).
    pub fn new(listen_port: u16, peer_port: u16) -> Self {
        Self {
            listen_port,
            peer_port,
            routes: HashMap::new(),
            statuses: Vec::new(),
        }
    }

    /// A session with `peer`: its status, and the task to run until
    /// `cancel`. One session per peer address.
    pub fn session(
        &mut self,
        peer: IpAddr,
        timers: Timers,
        cancel: CancellationToken,
    ) -> (
        watch::Receiver<BfdStatus>,
        impl Future<Output = ()> + Send + 'static,
    ) {
        let (tx, rx) = mpsc::channel(64);
        self.routes.insert(peer.to_canonical(), tx);
        let (status, status_rx) = watch::channel(BfdStatus::default());
        self.statuses.push(status.clone());
        let run = session::run(
            session::Peer {
                address: peer,
                port: self.peer_port,
                timers,
            },
            rx,
            status,
            cancel,
        );
        (status_rx, run)
    }

    /// The listener tasks (one per family with a session), to run until
    /// `cancel`.
    pub fn listeners(
        self,
        cancel: &CancellationToken,
    ) -> Vec<impl Future<Output = ()> + Send + 'static> {
        let routes = Arc::new(self.routes);
        let statuses = Arc::new(self.statuses);
        [false, true]
            .into_iter()
            .filter(|v6| routes.keys().any(|a| a.is_ipv6() == *v6))
            .map(|v6| {
                listen(
                    v6,
                    self.listen_port,
                    routes.clone(),
                    statuses.clone(),
                    cancel.clone(),
                )
            })
            .collect()
    }
}

/// One family's listener: binds (retrying: another BFD daemon may hold
/// the port for a while), then hands every acceptable packet to its
/// peer's session.
async fn listen(
    v6: bool,
    port: u16,
    routes: Arc<Routes>,
    statuses: Arc<Vec<watch::Sender<BfdStatus>>>,
    cancel: CancellationToken,
) {
    let family = if v6 { "IPv6" } else { "IPv4" };
    let sock = loop {
        match socket::listen(v6, port) {
            Ok(s) => {
                for s in statuses.iter() {
                    s.send_modify(|s| s.error = None);
                }
                break s;
            }
            Err(e) => {
                let why = format!("cannot listen on UDP {port} ({family}): {e}");
                tracing::warn!(error = why, "BFD listener; retrying");
                for s in statuses.iter() {
                    s.send_modify(|s| s.error = Some(why.clone()));
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(REBIND) => {}
                }
            }
        }
    };
    let mut buf = [0u8; 128];
    loop {
        let (n, from, ttl) = tokio::select! {
            () = cancel.cancelled() => return,
            r = socket::recv(&sock, &mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "BFD receive failed");
                    continue;
                }
            },
        };
        let packet = packet::accept(ttl, &buf[..n]).and_then(|p| {
            routes
                .get(&from.ip())
                .map(|r| (p, r))
                .ok_or(packet::Error::UnknownPeer(from.ip()))
        });
        match packet {
            // A full queue means the session is far behind; dropping is
            // what the network would have done.
            Ok((p, route)) => drop(route.try_send(p)),
            Err(e) => discard(from.ip(), &e),
        }
    }
}

/// Counts and logs (at debug: a flood must not flood the log) a
/// discarded packet.
fn discard(from: IpAddr, e: &packet::Error) {
    metrics::counter!("bulwark_lb_bfd_discarded_total").increment(1);
    tracing::debug!(%from, error = %e, "BFD packet discarded");
}
