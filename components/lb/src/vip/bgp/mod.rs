//! bgp mode: the holder binds the VIP locally (an address on an interface,
//! `lo` by default, through the same netlink code and kernel lifetime as
//! arp mode, so the front listener accepts it) and announces it as a host
//! route (/32, /128, both for a dual-stack VIP) over BGP instead of with
//! gratuitous ARP. Releasing withdraws the routes first, then deletes the
//! address.
//!
//! Every node keeps its sessions up ([`session`]), holder or not; only the
//! holder announces. The fencing is arp mode's: the VIP task claims and
//! releases from the quorum lease, and an announcement goes out only while
//! that lease is fresh. A holder that dies without withdrawing is covered
//! by the router's hold timer (docs/FAILOVER.md); graceful restart is not
//! advertised, so the router never keeps such a route past it.
//!
//! With BFD enabled for a peer ([`bfd`]), the router learns within its
//! BFD detection time (300 ms by default) that a holder's host is gone,
//! instead of after its hold timer, and our side takes a BGP session down
//! when its BFD session leaves Up.
//!
//! No maintained crate on crates.io is a BGP *speaker* that fits (the Rust
//! BGP crates are message codecs and MRT parsers), so [`codec`] is a
//! minimal one, fuzzed like the other decoders (fuzz/fuzz_targets/bgp.rs).

pub mod bfd;
pub mod codec;
pub mod md5;
pub mod session;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::session::{Desired, LocalConfig, PeerConfig, PeerStatus, ValidUntil};
use super::arp::{ArpVip, Renewal};

/// An announce or a withdrawal, for the status RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// When.
    pub at: SystemTime,
    /// Why (the lease decision that caused it).
    pub reason: String,
}

/// What `bulwarkctl lb status` shows of the speaker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BgpStatus {
    /// Every peer with its session.
    pub peers: Vec<(PeerConfig, PeerStatus)>,
    /// The last time the holder asked for the VIP to be announced.
    pub last_announce: Option<Event>,
    /// The last time it asked for a withdrawal.
    pub last_withdraw: Option<Event>,
}

/// A cheap handle that reads the speaker's state.
#[derive(Clone)]
pub struct StatusSource {
    peers: Vec<(PeerConfig, watch::Receiver<PeerStatus>)>,
    /// Each peer's BFD session, in `peers`' order (`None`: BFD off).
    bfd: Vec<Option<watch::Receiver<bfd::BfdStatus>>>,
    events: Arc<Mutex<(Option<Event>, Option<Event>)>>,
}

impl StatusSource {
    /// The state now.
    pub fn get(&self) -> BgpStatus {
        let (last_announce, last_withdraw) =
            self.events.lock().map(|e| e.clone()).unwrap_or_default();
        BgpStatus {
            peers: self
                .peers
                .iter()
                .zip(&self.bfd)
                .map(|((c, s), b)| {
                    let mut s = s.borrow().clone();
                    s.bfd = b.as_ref().map(|b| b.borrow().clone());
                    (c.clone(), s)
                })
                .collect(),
            last_announce,
            last_withdraw,
        }
    }
}

/// The bgp-mode actuator.
pub struct BgpVip {
    /// Binds the address locally (no announcements: BGP does that).
    local: ArpVip,
    desired: watch::Sender<Desired>,
    valid_until: ValidUntil,
    status: StatusSource,
    /// How long a release waits for the withdrawals to be written.
    flush: Duration,
    cancel: CancellationToken,
    /// One task per peer session (with its BFD session, if any) and the
    /// BFD listeners, each ending with what it was; the VIP task watches
    /// them ([`BgpVip::background_ended`]).
    sessions: JoinSet<String>,
}

impl BgpVip {
    /// Starts a session task per peer (they run until this is dropped);
    /// `local` binds the addresses whose host routes are announced.
    pub fn new(
        local: ArpVip,
        speaker: LocalConfig,
        peers: Vec<PeerConfig>,
        flush: Duration,
    ) -> Self {
        let (desired, desired_rx) = watch::channel(Desired::default());
        let valid_until: ValidUntil = Arc::default();
        let cancel = CancellationToken::new();
        let mut sources = Vec::with_capacity(peers.len());
        let mut bfd_sources = Vec::with_capacity(peers.len());
        let mut sessions = JoinSet::new();
        let mut hub = bfd::Hub::new(bfd::socket::PORT, bfd::socket::PORT);
        for peer in peers {
            let (status, status_rx) = watch::channel(PeerStatus::default());
            sources.push((peer.clone(), status_rx));
            let address = SocketAddr::new(peer.address, peer.port);
            let (bfd_rx, bfd_run) = match peer.bfd {
                Some(timers) => {
                    let (rx, run) = hub.session(peer.address, timers, cancel.clone());
                    (Some(rx), Some(run))
                }
                None => (None, None),
            };
            bfd_sources.push(bfd_rx.clone());
            let session = session::run(
                peer,
                speaker.clone(),
                desired_rx.clone(),
                valid_until.clone(),
                status,
                bfd_rx,
                cancel.clone(),
            );
            sessions.spawn(async move {
                match bfd_run {
                    Some(bfd) => drop(tokio::join!(session, bfd)),
                    None => session.await,
                }
                format!("the BGP session to {address} ended")
            });
        }
        for listener in hub.listeners(&cancel) {
            sessions.spawn(async move {
                listener.await;
                "a BFD listener ended".to_owned()
            });
        }
        Self {
            local,
            desired,
            valid_until,
            status: StatusSource {
                peers: sources,
                bfd: bfd_sources,
                events: Arc::default(),
            },
            flush,
            cancel,
            sessions,
        }
    }

    /// Ends when a peer session's task or the netlink connection ends
    /// before this actuator is dropped (sessions run until then, retrying
    /// on their own), saying which; pending otherwise.
    pub async fn background_ended(&mut self) -> String {
        let (sessions, local) = (&mut self.sessions, &mut self.local);
        let session = async {
            match sessions.join_next().await {
                Some(Ok(what)) => what,
                Some(Err(e)) if e.is_panic() => "a BGP session task panicked".to_owned(),
                Some(Err(_)) => "a BGP session task was cancelled".to_owned(),
                // No peers: nothing to watch.
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            why = session => why,
            why = local.connection_ended() => why,
        }
    }

    /// The handle the status RPC reads.
    pub fn status(&self) -> StatusSource {
        self.status.clone()
    }

    fn record(&self, announce: bool, reason: &str) {
        let event = Event {
            at: SystemTime::now(),
            reason: reason.to_owned(),
        };
        if let Ok(mut e) = self.status.events.lock() {
            if announce {
                e.0 = Some(event);
            } else {
                e.1 = Some(event);
            }
        }
        if announce {
            metrics::counter!("bulwark_lb_bgp_announces_total").increment(1);
        } else {
            metrics::counter!("bulwark_lb_bgp_withdrawals_total").increment(1);
        }
    }

    /// Asks every session for `announce`; returns the generation to wait for.
    fn ask(&self, announce: bool) -> u64 {
        let mut generation = 0;
        self.desired.send_modify(|d| {
            d.generation += 1;
            d.announce = announce;
            generation = d.generation;
        });
        generation
    }

    /// Binds the addresses, then announces them to every established peer
    /// (and to each one that comes up while this is held).
    pub async fn claim(&mut self, reason: &str) -> std::io::Result<()> {
        self.local.claim().await?;
        self.ask(true);
        self.record(true, reason);
        Ok(())
    }

    /// Withdraws the routes from every established peer (waiting at most
    /// the flush bound for the UPDATEs to be written) and resets the front's
    /// clients meanwhile, then deletes the addresses.
    pub async fn release(&mut self, reason: &str) -> std::io::Result<()> {
        if let Ok(mut v) = self.valid_until.lock() {
            *v = None;
        }
        let generation = self.ask(false);
        self.record(false, reason);
        let waits = self.status.peers.iter().map(|(_, rx)| {
            let mut rx = rx.clone();
            async move {
                // Done once the withdrawal is written, or when the session
                // is not up (a session that comes up later announces
                // nothing: nothing is desired).
                let _ = rx
                    .wait_for(|s| {
                        s.applied >= generation || s.state != session::SessionState::Established
                    })
                    .await;
            }
        });
        // The front's clients are reset meanwhile (within half the flush
        // bound), while the address is still there to send from.
        let (flushed, ()) = tokio::join!(
            tokio::time::timeout(self.flush, futures::future::join_all(waits)),
            self.local.reset_clients(),
        );
        if flushed.is_err() {
            tracing::warn!(flush = ?self.flush, "not every BGP withdrawal was written in time; deleting the address anyway");
        }
        self.local.release().await
    }

    /// How many times the lease watchdog deleted the local address.
    pub fn watchdog_releases(&self) -> u64 {
        self.local.watchdog_releases()
    }

    /// Records that the lease is fresh until `until`; `fenced` as for
    /// [`ArpVip::hold_until`] (the lease watchdog deletes the local
    /// address; the withdrawals stay the VIP task's).
    pub fn hold_until(&self, until: Instant, fenced: bool) {
        self.local.hold_until(until, fenced);
        if let Ok(mut v) = self.valid_until.lock() {
            *v = Some(until);
        }
    }

    /// Notified when the local address is deleted ([`ArpVip::vanished`]).
    pub fn vanished(&self) -> Arc<tokio::sync::Notify> {
        self.local.vanished()
    }

    /// The local address's renewal interval.
    pub fn renew_interval(&self) -> Duration {
        self.local.renew_interval()
    }

    /// Renews the local address. If it vanished and could not be added
    /// again the routes are withdrawn too: a route to a node that does not
    /// accept the address would black-hole the VIP.
    pub async fn renew(&mut self, valid_until: Instant) -> std::io::Result<Renewal> {
        let r = self.local.renew(valid_until).await?;
        if let Renewal::Dropped(why) = &r {
            self.ask(false);
            self.record(
                false,
                &format!("the local address could not be added again: {why}"),
            );
        }
        Ok(r)
    }

    /// Deletes an address a previous run left (see [`ArpVip::remove_stale`]).
    pub async fn remove_stale(&mut self) -> std::io::Result<bool> {
        self.local.remove_stale().await
    }
}

impl Drop for BgpVip {
    fn drop(&mut self) {
        // The sessions send a Cease and close; the router drops our routes.
        // Detached, not aborted: they must live long enough to say so.
        self.cancel.cancel();
        self.sessions.detach_all();
    }
}
