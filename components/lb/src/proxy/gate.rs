//! The gate of an arp- or bgp-mode front listener: which client
//! connections the node may proxy for the VIP, and resetting them when it
//! gives the VIP up.
//!
//! In those modes every node keeps its front listener on VIP:port for its
//! whole life (bound with `IP_FREEBIND`), and releasing the VIP deletes an
//! address, not a listener. A connection accepted while holding would
//! outlive the release: once the address is gone the kernel can no longer
//! send from it (not even a reset), so its client waits for its own
//! timeouts (a watch can sit silent for minutes) while the new holder
//! serves everybody else. The VIP actuator therefore closes the gate
//! *before* it deletes the address: every connection of the holding is
//! reset while the address still exists, so the resets reach the clients
//! and they reconnect, to the new holder, at once.
//!
//! ```text
//!   claim:   open() ──▶ add the address ──▶ accept, track under this holding
//!   release: close() ──▶ resets sent (bounded wait) ──▶ delete the address
//! ```
//!
//! While the gate is closed the listener accepts nothing (an accept under
//! way is abandoned when it closes): a connection that reaches it then
//! (the address of a node that is still starting beside another front, or
//! a packet racing the release) waits in the kernel's accept queue until
//! the next holding instead of being proxied by a node that does not hold
//! the VIP. One accepted in the moment between `close` and the accept loop
//! seeing it is reset at once.
//!
//! A gate made with [`FrontGate::tracking_clients`] also carries a
//! [`ClientTable`]: each connection is in it while open, and the holder shares it with its peers so that the
//! next holder can reset those clients if this node vanishes without
//! closing the gate ([`crate::clients`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clients::ClientTable;

/// Shared by the VIP actuator (which opens and closes it) and the front
/// listeners of the VIP's addresses (one, or two for a dual-stack VIP).
#[derive(Clone)]
pub struct FrontGate {
    inner: Arc<Inner>,
}

struct Inner {
    /// The current holding; `None` while closed.
    holding: Mutex<Option<Holding>>,
    /// Whether the gate is open, for the accept loops to wait on.
    open: watch::Sender<bool>,
    /// Parent of every holding's close token: a front listener's shutdown
    /// grace ending cancels it and so closes every connection left.
    root: CancellationToken,
    /// The open connections of the front listeners behind this gate, when
    /// they are kept (`vip.tickleClients`); without it nothing is added to
    /// the per-connection path.
    clients: Option<ClientTable>,
}

/// The connections accepted during one holding of the VIP.
#[derive(Clone)]
pub(super) struct Holding {
    /// Cancelled when the holding ends: its connections are reset.
    pub(super) close: CancellationToken,
    /// Counts them, so the release can wait until the resets are sent.
    pub(super) tracker: TaskTracker,
}

/// What closing the gate did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closed {
    /// Connections of the holding that were open when the gate closed.
    pub reset: usize,
    /// Of those, how many had not finished closing when the wait ended.
    pub left: usize,
}

impl Default for FrontGate {
    fn default() -> Self {
        Self::new()
    }
}

impl FrontGate {
    /// A closed gate that keeps no client table.
    pub fn new() -> Self {
        Self::with_clients(None)
    }

    /// A closed gate whose front listeners keep their open connections in
    /// a [`ClientTable`] (for the tickles after a failover).
    pub fn tracking_clients() -> Self {
        Self::with_clients(Some(ClientTable::new()))
    }

    fn with_clients(clients: Option<ClientTable>) -> Self {
        Self {
            inner: Arc::new(Inner {
                holding: Mutex::new(None),
                open: watch::Sender::new(false),
                root: CancellationToken::new(),
                clients,
            }),
        }
    }

    /// The open client connections of the front listeners behind this
    /// gate, when it keeps them (the VIP task's sharer and tickles read
    /// it).
    pub fn clients(&self) -> Option<&ClientTable> {
        self.inner.clients.as_ref()
    }

    /// Starts a holding: connections accepted from now on are proxied
    /// until [`FrontGate::close`]. Call it before the address is added, so
    /// no connection of the new holding arrives at a closed gate. Opening
    /// an open gate keeps its holding.
    pub fn open(&self) {
        let mut h = self.lock();
        if h.is_none() {
            *h = Some(Holding {
                close: self.inner.root.child_token(),
                tracker: TaskTracker::new(),
            });
        }
        drop(h);
        self.inner.open.send_replace(true);
    }

    /// Ends the holding: accepting stops, and every connection of the
    /// holding is reset. Waits up to `within` for the resets to be sent
    /// (each connection's thread closes its socket), so the caller can
    /// delete the address right after; a bounded wait, because the fencing
    /// budget counts the whole release.
    pub async fn close(&self, within: Duration) -> Closed {
        let Some((reset, tracker)) = self.end_holding() else {
            return Closed::default();
        };
        if reset > 0 {
            let _ = tokio::time::timeout(within, tracker.wait()).await;
        }
        Closed {
            reset,
            left: tracker.len(),
        }
    }

    /// Ends the holding like [`FrontGate::close`] without waiting for the
    /// resets: for a caller off the runtime that must delete the address
    /// next whatever happens (the lease watchdog). Returns how many
    /// connections are being reset.
    pub fn close_now(&self) -> usize {
        self.end_holding().map_or(0, |(reset, _)| reset)
    }

    /// Stops accepting and starts resetting the holding's connections;
    /// how many there were and the tracker that sees them end.
    fn end_holding(&self) -> Option<(usize, TaskTracker)> {
        let holding = self.lock().take();
        self.inner.open.send_replace(false);
        let h = holding?;
        // Counted before the cancel: the connections' threads start
        // closing at once.
        let reset = h.tracker.len();
        h.close.cancel();
        h.tracker.close();
        Some((reset, h.tracker))
    }

    /// Whether a holding is open.
    pub fn is_open(&self) -> bool {
        *self.inner.open.borrow()
    }

    /// The current holding, if the gate is open.
    pub(super) fn holding(&self) -> Option<Holding> {
        self.lock().clone()
    }

    /// Resolves once the gate is open.
    pub(super) async fn opened(&self) {
        let mut rx = self.inner.open.subscribe();
        // The sender lives in `self`: the wait cannot fail.
        let _ = rx.wait_for(|open| *open).await;
    }

    /// Resolves once the gate is closed.
    pub(super) async fn closed(&self) {
        let mut rx = self.inner.open.subscribe();
        let _ = rx.wait_for(|open| !*open).await;
    }

    /// The token the front listeners close their connections with when
    /// their shutdown grace is over.
    pub(super) fn root(&self) -> CancellationToken {
        self.inner.root.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Holding>> {
        // Nothing panics while holding the lock; a poisoned one still has
        // a consistent value.
        self.inner
            .holding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_cancels_the_holding_and_waits_for_its_connections() {
        let gate = FrontGate::new();
        assert!(!gate.is_open());
        assert!(gate.holding().is_none());
        assert_eq!(gate.close(Duration::from_secs(1)).await, Closed::default());

        gate.open();
        assert!(gate.is_open());
        let h = gate.holding().unwrap();
        // Opening again keeps the holding (a claim retried while held).
        gate.open();
        let again = gate.holding().unwrap();
        assert!(!again.close.is_cancelled());
        for _ in 0..3 {
            let close = h.close.clone();
            tokio::spawn(h.tracker.track_future(async move {
                close.cancelled().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }));
        }
        let closed = gate.close(Duration::from_secs(5)).await;
        assert_eq!(closed, Closed { reset: 3, left: 0 });
        assert!(h.close.is_cancelled() && again.close.is_cancelled());
        assert!(!gate.is_open());
        assert!(gate.holding().is_none());

        // The next holding is a fresh one.
        gate.open();
        assert!(!gate.holding().unwrap().close.is_cancelled());
    }

    #[tokio::test]
    async fn the_wait_is_bounded() {
        let gate = FrontGate::new();
        gate.open();
        let h = gate.holding().unwrap();
        tokio::spawn(h.tracker.track_future(std::future::pending::<()>()));
        let closed = gate.close(Duration::from_millis(20)).await;
        assert_eq!(closed, Closed { reset: 1, left: 1 });
    }

    #[tokio::test]
    async fn the_root_closes_every_holding() {
        let gate = FrontGate::new();
        gate.open();
        let h = gate.holding().unwrap();
        gate.root().cancel();
        assert!(h.close.is_cancelled());
    }

    #[tokio::test]
    async fn opened_resolves_on_open() {
        let gate = FrontGate::new();
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.opened().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        gate.open();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
