//! The virtual IP: who may hold it ([`fence`]) and how it is taken and
//! given up ([`bind`]: a listener on the VIP; [`arp`]: an address, or a
//! dual-stack IPv4 + IPv6 pair held as one, on an interface, announced with
//! gratuitous ARP / unsolicited neighbour advertisements; [`bgp`]: the
//! same local address, announced as a host route over BGP; [`iface`]:
//! which address families an interface has, for the config check).
//!
//! One task per node ([`VipTask`]) owns the VIP. It wakes on a change of
//! Raft's role, leader, vote or membership, while it leads also on every
//! quorum acknowledgement, and while it leads or holds every
//! `checkInterval`; it asks the [`fence::Fence`] what to do, and does it.
//! A claim is followed by a `RecordVipHolder` proposal carrying the
//! failover's measured durations. In arp mode the
//! holder also renews the address's kernel lifetime every quarter of it
//! while the fence still passes, so a holder that dies or freezes without
//! releasing loses the address anyway; an address someone else deletes
//! under a live holder is renewed (added back) as soon as the kernel
//! reports the deletion. Leadership
//! transfers and shutdown go through [`VipHandle::hand_over`], which
//! returns only once the VIP is released. In arp and bgp mode the task
//! records its lease with a [`watchdog`] thread that releases in its place
//! if the task, running late on a busy node, has not released one
//! `checkInterval` after the lease.
//!
//! In arp and bgp mode an nftables rule ([`refusals`]) keeps a killed
//! holder's lingering address from refusing connects: its clients retry
//! their SYN onto the next holder instead of failing.
//!
//! In arp and bgp mode a claim that takes the VIP over from another node
//! is followed by tickle ACKs to that node's clients ([`Tickles`],
//! [`crate::clients`]): their connections ran through a holder that may be
//! cut off, and are reset at once instead of at the clients' timeouts.

pub mod arp;
pub mod bgp;
pub mod bind;
pub mod fence;
pub mod iface;
pub mod refusals;
pub mod watchdog;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bulwark_api::raft::v1 as pb;
use bulwark_common::workers::Worker;
use futures::future::BoxFuture;
use openraft::async_runtime::WatchReceiver;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::arp::{ArpVip, Renewal};
use self::bgp::BgpVip;
use self::bind::BindVip;
use self::fence::{Action, Fence, FenceTiming, LeaderView, ReleaseReason};
use crate::clients::{ClientTable, Received, tickle};
use crate::raft::network::Handover;
use crate::raft::server::Signals;
use crate::raft::state::command;
use crate::raft::{DataMetrics, NodeId, Raft, ServerMetrics};

/// How the VIP is taken and released.
pub enum Actuator {
    /// bind mode.
    Bind(BindVip),
    /// arp mode.
    Arp(ArpVip),
    /// bgp mode.
    Bgp(BgpVip),
}

impl Actuator {
    /// Takes the VIP; `reason` is recorded where the mode shows it (bgp).
    async fn claim(&mut self, reason: &str) -> std::io::Result<()> {
        match self {
            Actuator::Bind(b) => b.claim(),
            Actuator::Arp(a) => a.claim().await,
            Actuator::Bgp(g) => g.claim(reason).await,
        }
    }

    async fn release(&mut self, reason: &str) -> std::io::Result<()> {
        match self {
            Actuator::Bind(b) => b.release(),
            Actuator::Arp(a) => a.release().await,
            Actuator::Bgp(g) => g.release(reason).await,
        }
    }

    /// How often a held VIP must be renewed; `None` when it never expires
    /// by itself (bind mode: the listener dies with the process).
    fn renew_interval(&self) -> Option<Duration> {
        match self {
            Actuator::Bind(_) => None,
            Actuator::Arp(a) => Some(a.renew_interval()),
            Actuator::Bgp(g) => Some(g.renew_interval()),
        }
    }

    /// Notified when the held address was deleted by someone else (arp
    /// and bgp mode).
    fn vanished(&self) -> Option<Arc<tokio::sync::Notify>> {
        match self {
            Actuator::Bind(_) => None,
            Actuator::Arp(a) => Some(a.vanished()),
            Actuator::Bgp(g) => Some(g.vanished()),
        }
    }

    /// Tells the actuator the holder's lease is fresh until `until`, and
    /// whether the lease watchdog enforces it (not for a sole voter).
    fn hold_until(&self, until: Instant, fenced: bool) {
        match self {
            Actuator::Bind(_) => {}
            Actuator::Arp(a) => a.hold_until(until, fenced),
            Actuator::Bgp(g) => g.hold_until(until, fenced),
        }
    }

    /// Ends when a task the actuator runs in the background ends while it
    /// should still run (bind mode's front listener while held, a bgp
    /// session, the netlink connection), saying which; pending otherwise.
    async fn background_ended(&mut self) -> String {
        match self {
            Actuator::Bind(b) => b.serving_ended().await,
            Actuator::Arp(a) => a.connection_ended().await,
            Actuator::Bgp(g) => g.background_ended().await,
        }
    }

    /// How many times the lease watchdog released the VIP (arp and bgp
    /// mode).
    fn watchdog_releases(&self) -> u64 {
        match self {
            Actuator::Bind(_) => 0,
            Actuator::Arp(a) => a.watchdog_releases(),
            Actuator::Bgp(g) => g.watchdog_releases(),
        }
    }

    /// Renews a held VIP if still before `valid_until`.
    async fn renew(&mut self, valid_until: Instant) -> std::io::Result<Renewal> {
        match self {
            Actuator::Bind(_) => Ok(Renewal::Renewed),
            Actuator::Arp(a) => a.renew(valid_until).await,
            Actuator::Bgp(g) => g.renew(valid_until).await,
        }
    }
}

/// Pause before retrying a failed renewal (well inside a renew interval,
/// which is at least 250 ms).
const RENEW_RETRY: Duration = Duration::from_millis(50);

/// Pause before claiming again after a claim failed. Not every check: a
/// dual-stack claim whose second family fails adds and deletes the first
/// one each time, and that address must not flicker a hundred times a
/// second (connections accepted in a flicker break).
const CLAIM_RETRY: Duration = Duration::from_millis(200);

/// What the VIP task reports (for the API and metrics).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VipState {
    /// This node holds the VIP now.
    pub holding: bool,
    /// Since when (wall clock), while holding.
    pub since: Option<SystemTime>,
    /// Lease left at the last check, while holding.
    pub lease_remaining: Option<Duration>,
}

enum Control {
    Handover {
        term: u64,
        done: oneshot::Sender<()>,
    },
}

/// The handle the Raft network and the shutdown path use.
#[derive(Clone)]
pub struct VipHandle {
    tx: Option<mpsc::Sender<Control>>,
    state: watch::Receiver<VipState>,
    /// bgp mode: the speaker's sessions, set when the task is built.
    bgp: Arc<OnceLock<bgp::StatusSource>>,
}

impl VipHandle {
    /// The current state.
    pub fn state(&self) -> VipState {
        self.state.borrow().clone()
    }

    /// bgp mode: the sessions and the last announce and withdrawal.
    pub fn bgp(&self) -> Option<bgp::BgpStatus> {
        self.bgp.get().map(bgp::StatusSource::get)
    }

    /// Releases the VIP and never claims it again in `term` or before.
    pub async fn release_for_handover(&self, term: u64) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Control::Handover { term, done }).await.is_ok() {
            // An error means the task ended, which released the VIP.
            let _ = wait.await;
        }
    }
}

impl Handover for VipHandle {
    fn hand_over(&self, term: u64) -> BoxFuture<'static, ()> {
        let this = self.clone();
        Box::pin(async move { this.release_for_handover(term).await })
    }
}

/// Resolves when `n` is notified; never without one.
async fn notified(n: Option<&tokio::sync::Notify>) {
    match n {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// The VIP task's name as a worker (`/debug/workers`).
pub const WORKER: &str = "vip";

/// What a claim needs to tickle the previous holder's clients
/// (`vip.tickleClients`).
pub struct Tickles {
    /// The latest client table a holder shared with this node.
    pub received: Received,
    /// This node's own front connections, which are never tickled.
    pub own: ClientTable,
    /// The VIP's addresses: a tickle is only ever sent from one of them,
    /// whatever a peer's table says.
    pub vips: Vec<std::net::IpAddr>,
}

/// The task that owns the VIP on one node.
pub struct VipTask {
    node_id: NodeId,
    raft: Raft,
    fence: Fence,
    actuator: Actuator,
    /// What Raft observed, and the fence timers of the other nodes: a
    /// claim waits out the longest hold among them.
    signals: Arc<Signals>,
    rx: mpsc::Receiver<Control>,
    state: watch::Sender<VipState>,
    /// Where the task reports (`/debug/workers`): holding or standby,
    /// each claim and renewal, each failure.
    worker: Worker,
    /// arp and bgp mode with `vip.tickleClients`.
    tickles: Option<Tickles>,
    /// Cancels the tickles of the current holding when it ends: they are
    /// only for right after the claim.
    tickling: CancellationToken,
    /// The lease watchdog's releases this task has accounted for.
    watchdog_seen: u64,
}

/// The receiving half of a [`VipHandle`], turned into a task by
/// [`VipTask::new`] once the Raft node exists (the Raft network needs the
/// handle first).
pub struct VipInbox {
    rx: mpsc::Receiver<Control>,
    state: watch::Sender<VipState>,
    bgp: Arc<OnceLock<bgp::StatusSource>>,
}

/// A connected handle and inbox.
pub fn channel() -> (VipHandle, VipInbox) {
    let (tx, rx) = mpsc::channel(4);
    let (state, state_rx) = watch::channel(VipState::default());
    let bgp = Arc::new(OnceLock::new());
    (
        VipHandle {
            tx: Some(tx),
            state: state_rx,
            bgp: bgp.clone(),
        },
        VipInbox { rx, state, bgp },
    )
}

impl VipTask {
    /// The task owning `actuator`, controlled through `inbox`.
    pub fn new(
        inbox: VipInbox,
        node_id: NodeId,
        raft: Raft,
        timing: FenceTiming,
        actuator: Actuator,
        signals: Arc<Signals>,
    ) -> Self {
        if let Actuator::Bgp(g) = &actuator {
            let _ = inbox.bgp.set(g.status());
        }
        Self {
            node_id,
            raft,
            fence: Fence::new(timing),
            actuator,
            signals,
            rx: inbox.rx,
            state: inbox.state,
            worker: Worker::detached(WORKER),
            tickles: None,
            tickling: CancellationToken::new(),
            watchdog_seen: 0,
        }
    }

    /// Tickles the previous holder's clients after each claim (arp and bgp
    /// mode; bind mode moves no address, so the clients' answers would not
    /// come here).
    #[must_use]
    pub fn with_tickles(mut self, tickles: Tickles) -> Self {
        if !matches!(self.actuator, Actuator::Bind(_)) {
            self.tickles = Some(tickles);
        }
        self
    }

    /// Reports through `worker` (the daemon's registry) from now on.
    #[must_use]
    pub fn with_worker(mut self, worker: Worker) -> Self {
        self.worker = worker;
        self
    }

    /// What the fence decides on, from Raft's server metrics (role, term,
    /// membership) and data metrics (the last quorum acknowledgement).
    /// openraft sends the data metrics before the server metrics, so a wake
    /// on a role change reads acknowledgements at least as new as it, and
    /// a wake on the data metrics of a leader that has just stepped down
    /// sees it in them ([`crate::raft::leader_term`]).
    fn view(&self, server: &ServerMetrics, data: &DataMetrics) -> (LeaderView, bool) {
        let cluster = self.signals.timers().cluster(Instant::now());
        let leader_term = crate::raft::leader_term(server, data, self.node_id);
        // A lone voter is its own quorum: nothing acknowledges it, and
        // nothing else can lead while it does.
        let alone = server
            .membership_config
            .membership()
            .voter_ids()
            .eq([self.node_id]);
        if leader_term.is_some() && alone {
            let view = LeaderView {
                leader_term,
                last_quorum_acked: Some(Instant::now()),
                cluster,
            };
            return (view, true);
        }
        let acked = data.last_quorum_acked.map(|a| {
            // openraft's instant wraps tokio's; map through "elapsed".
            let age = openraft::Instant::elapsed(&a.into_inner());
            Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
        });
        let view = LeaderView {
            leader_term,
            last_quorum_acked: leader_term.and(acked),
            cluster,
        };
        (view, false)
    }

    fn transfer_recent(&self, now: Instant) -> bool {
        // A transfer election starts right after the request is accepted;
        // a generous window only costs a longer wait.
        let window = self.fence.timing().follower_lease * 5;
        self.signals
            .transfer_at()
            .is_some_and(|t| now.saturating_duration_since(t) < window)
    }

    /// Runs until `shutdown`, then releases the VIP for good.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.worker.set_state("standby");
        // Not openraft's full metrics: those are sent again after every
        // message Raft handles, changed or not.
        let mut server = self.raft.server_metrics();
        let mut data = self.raft.data_metrics();
        let mut tick = tokio::time::interval(self.fence.timing().check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Only a leader or a holder has anything to decide as time passes
        // (a claim delay running out, its lease), and only a leader as
        // quorum acknowledgements come in: a follower that holds nothing
        // decides only when its role, leader, vote or membership changes.
        let mut leading = false;
        let mut ticking = false;
        let mut kicked = None;
        let mut recorded_term = None;
        // When the held address is due for renewal (arp mode).
        let mut renew_at: Option<Instant> = None;
        // No claim before this: the last one failed.
        let mut claim_after: Option<Instant> = None;
        let vanished = self.actuator.vanished();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    if self.fence.fence_forever() {
                        self.release(ReleaseReason::Handover).await;
                    }
                    return Ok(());
                }
                Some(Control::Handover { term, done }) = self.rx.recv() => {
                    if self.fence.fence_through(term) {
                        self.release(ReleaseReason::Handover).await;
                    }
                    let _ = done.send(());
                }
                r = server.changed() => if r.is_err() {
                    self.raft_stopped().await;
                    return Ok(());
                },
                r = data.changed(), if leading => if r.is_err() {
                    self.raft_stopped().await;
                    return Ok(());
                },
                _ = tick.tick(), if ticking => {}
                why = self.actuator.background_ended() => {
                    return Err(self.background_failed(why).await);
                }
                // The held address was deleted: renew (add it back) now.
                () = notified(vanished.as_deref()) => renew_at = renew_at.map(|_| Instant::now()),
            }
            let (view, alone) = self.view(&server.borrow_watched(), &data.borrow_watched());
            let now = Instant::now();
            // A new leader learns its first quorum acknowledgement from the
            // next heartbeat round, up to a heartbeat interval away: ask for
            // one at once, so the claim does not wait for the tick.
            if let Some(term) = view.leader_term
                && !self.fence.holding()
                && kicked != Some(term)
            {
                kicked = Some(term);
                self.kick_heartbeat();
            }
            let transfer = self.transfer_recent(now);
            let action = self.fence.decide(&view, now, transfer);
            if self.fence.holding()
                && let Some(remaining) = self.fence.lease_remaining(&view, now)
            {
                self.actuator.hold_until(now + remaining, !alone);
            }
            match action {
                // Renew only right after the fence said "keep holding".
                Action::None if self.fence.holding() && renew_at.is_some_and(|at| now >= at) => {
                    renew_at = self.renew(&view, now).await;
                }
                Action::None => {}
                Action::Claim { .. } if claim_after.is_some_and(|at| now < at) => {
                    self.fence.claim_failed();
                }
                Action::Claim {
                    term,
                    elected_at,
                    after_transfer,
                } => {
                    let first_in_term = recorded_term != Some(term);
                    match self.take(term, &view, first_in_term).await {
                        Ok((claimed, renew)) => {
                            renew_at = renew;
                            if first_in_term {
                                recorded_term = Some(term);
                                self.record(term, elected_at, claimed, after_transfer);
                            }
                        }
                        Err(retry) => claim_after = Some(retry),
                    }
                }
                Action::Release(reason) => self.release(reason).await,
            }
            leading = view.leader_term.is_some();
            ticking = leading || self.fence.holding();
            if self.fence.holding() {
                let remaining = self.fence.lease_remaining(&view, now);
                self.state.send_if_modified(|s| {
                    let changed = s.lease_remaining != remaining;
                    s.lease_remaining = remaining;
                    changed
                });
            }
        }
    }

    /// Raft stopped: nothing may be held without it.
    async fn raft_stopped(&mut self) {
        if self.fence.fence_forever() {
            self.release(ReleaseReason::LostLeadership).await;
        }
    }

    /// CLAIM: takes the VIP as leader of `term`. Returns when it was taken
    /// and when to renew it, or (it failed) when to try again.
    async fn take(
        &mut self,
        term: u64,
        view: &LeaderView,
        first_in_term: bool,
    ) -> Result<(Instant, Option<Instant>), Instant> {
        let reason = format!("leader of term {term} with a fresh quorum lease");
        if let Err(e) = self.actuator.claim(&reason).await {
            tracing::error!(term, error = %e, "could not take the VIP; retrying");
            self.worker.failed(&format_args!("taking the VIP: {e}"));
            self.fence.claim_failed();
            return Err(Instant::now() + CLAIM_RETRY);
        }
        let claimed = Instant::now();
        self.worker.set_state("holding");
        self.worker.succeeded();
        metrics::counter!("bulwark_lb_vip_acquisitions_total").increment(1);
        metrics::gauge!("bulwark_lb_vip_held").set(1.0);
        if !first_in_term {
            // The lease lapsed (acks were late) and came back in the same
            // term: no leadership moved.
            tracing::warn!(term, "took the VIP again after a lease lapse");
        }
        self.state.send_replace(VipState {
            holding: true,
            since: Some(SystemTime::now()),
            lease_remaining: self.fence.lease_remaining(view, claimed),
        });
        self.tickle(term);
        Ok((claimed, self.actuator.renew_interval().map(|i| claimed + i)))
    }

    /// Right after a claim: tickles the clients of the previous holder's
    /// table (another node's, of an earlier term), leaving out any
    /// connection this node's own front has, in a task of its own so the
    /// loop goes on; a release stops it.
    fn tickle(&mut self, term: u64) {
        let Some(t) = &self.tickles else { return };
        let Some(table) = t.received.take_for_claim(self.node_id, term) else {
            return;
        };
        metrics::gauge!("bulwark_lb_vip_clients_received").set(0.0);
        let off_vip = table
            .flows
            .iter()
            .filter(|f| !t.vips.contains(&f.vip.ip()))
            .count();
        if off_vip > 0 {
            tracing::warn!(
                term,
                from = table.holder,
                off_vip,
                "left out shared client connections that are not on this node's VIP addresses (a peer with another vip config?)"
            );
        }
        let flows = crate::clients::to_tickle(table.flows, &t.vips, &t.own);
        if flows.is_empty() {
            return;
        }
        let (from, age) = (table.holder, table.at.elapsed());
        self.tickling = CancellationToken::new();
        let stop = self.tickling.clone();
        tokio::spawn(async move {
            let Some(sent) = stop.run_until_cancelled(tickle::send_all(&flows)).await else {
                tracing::info!(term, from, "released the VIP while tickling; stopped");
                return;
            };
            metrics::counter!("bulwark_lb_vip_tickles_sent_total").increment(sent.sent as u64);
            metrics::counter!("bulwark_lb_vip_tickle_failures_total").increment(sent.failed as u64);
            tracing::info!(
                term,
                from,
                clients = flows.len(),
                sent = sent.sent,
                failed = sent.failed,
                first_round_took = ?sent.first_round,
                table_age = ?age,
                "tickled the previous holder's clients (two rounds)"
            );
        });
    }

    /// The VIP cannot be served or kept any more (`why`): releases it and
    /// returns the error that ends the task, which stops the daemon (a
    /// critical task), so leadership moves to a node that can hold it.
    async fn background_failed(&mut self, why: String) -> anyhow::Error {
        if self.fence.fence_forever() {
            self.release(ReleaseReason::Handover).await;
        }
        anyhow::anyhow!(why)
    }

    /// Asks Raft for a heartbeat round now. A short task of its own, so
    /// the VIP task's loop never waits on Raft.
    fn kick_heartbeat(&self) {
        let raft = self.raft.clone();
        tokio::spawn(async move {
            let _ = raft.trigger().heartbeat().await;
        });
    }

    /// Renews the held address's lifetime. A failure never drops the VIP
    /// (the fence alone decides that): it is logged, counted and retried
    /// soon. Returns when to renew next.
    async fn renew(&mut self, view: &LeaderView, now: Instant) -> Option<Instant> {
        let interval = self.actuator.renew_interval()?;
        let term = view.leader_term;
        let Some(remaining) = self.fence.lease_remaining(view, now) else {
            // Not holding after all: the next claim schedules renewals.
            return None;
        };
        let valid_until = now + remaining;
        match self.actuator.renew(valid_until).await {
            Ok(Renewal::Renewed) => {
                self.worker.succeeded();
                Some(Instant::now() + interval)
            }
            Ok(Renewal::Dropped(why)) => {
                // A dual-stack VIP lost one family for good: the other was
                // deleted too. Holding nothing now; the fence claims both
                // again on its next decision if this node still leads.
                tracing::error!(
                    term,
                    error = %why,
                    "a VIP address vanished and could not be added again; released the whole VIP, claiming it again"
                );
                self.fence.claim_failed();
                self.worker.set_state("standby");
                self.worker.failed(&format_args!(
                    "a VIP address vanished and could not be added again: {why}"
                ));
                metrics::counter!("bulwark_lb_vip_releases_total", "reason" => "readd_failed")
                    .increment(1);
                metrics::gauge!("bulwark_lb_vip_held").set(0.0);
                self.state.send_replace(VipState::default());
                None
            }
            Ok(Renewal::Readded) => {
                if self.watchdog_released() {
                    // Counted by the watchdog already; not someone else's
                    // deletion.
                    tracing::warn!(
                        term,
                        "this VIP task ran late and its lease watchdog released the VIP, but the lease is fresh again; added and announced it again"
                    );
                } else {
                    tracing::warn!(
                        term,
                        "the VIP had vanished from the interface while this node still held it; added and announced it again"
                    );
                    metrics::counter!("bulwark_lb_vip_readded_total").increment(1);
                }
                Some(Instant::now() + interval)
            }
            Err(e) => {
                tracing::warn!(term, error = %e, "renewing the VIP's address lifetime failed; still holding, retrying");
                self.worker
                    .failed(&format_args!("renewing the address lifetime: {e}"));
                metrics::counter!("bulwark_lb_vip_renew_failures_total").increment(1);
                Some(Instant::now() + interval.min(RENEW_RETRY))
            }
        }
    }

    async fn release(&mut self, reason: ReleaseReason) {
        let started = Instant::now();
        self.tickling.cancel();
        if let Err(e) = self.actuator.release(reason.as_str()).await {
            // Nothing more can be done here; the fencing budget assumed it
            // works, so say so loudly.
            tracing::error!(reason = reason.as_str(), error = %e, "releasing the VIP failed");
            self.worker.failed(&format_args!("releasing the VIP: {e}"));
        }
        self.worker.set_state("standby");
        // The watchdog may have deleted the addresses already.
        let watchdog_first = self.watchdog_released();
        tracing::warn!(reason = reason.as_str(), took = ?started.elapsed(), watchdog_first, "released the VIP");
        metrics::counter!("bulwark_lb_vip_releases_total", "reason" => reason.as_str())
            .increment(1);
        metrics::gauge!("bulwark_lb_vip_held").set(0.0);
        self.state.send_replace(VipState::default());
    }

    /// Whether the lease watchdog released the VIP since this was last
    /// asked.
    fn watchdog_released(&mut self) -> bool {
        let released = self.actuator.watchdog_releases();
        let new = released > self.watchdog_seen;
        self.watchdog_seen = released;
        new
    }

    /// Logs, measures and proposes the failover record.
    fn record(&self, term: u64, elected_at: Instant, claimed: Instant, after_transfer: bool) {
        // The leader this node last followed, and its last append this
        // node accepted: unchanged since the election, since a leader
        // accepts no other leader's append without stepping down.
        let previous = self
            .signals
            .last_append()
            .filter(|h| h.from != self.node_id);
        let from = previous.map(|h| h.from);
        let detect = previous.map(|h| elected_at.saturating_duration_since(h.at));
        let moved = claimed.saturating_duration_since(elected_at);
        let cause = match (from, after_transfer) {
            (None, _) => pb::FailoverCause::Startup,
            (Some(_), true) => pb::FailoverCause::Transfer,
            (Some(_), false) => pb::FailoverCause::LeaderLost,
        };
        tracing::info!(
            term,
            from = ?from,
            time_to_detect = ?detect,
            time_to_move = ?moved,
            cause = cause.as_str_name(),
            "took the VIP"
        );
        if let Some(d) = detect {
            metrics::histogram!("bulwark_lb_failover_detect_seconds").record(d.as_secs_f64());
            metrics::histogram!("bulwark_lb_failover_duration_seconds")
                .record((d + moved).as_secs_f64());
        }
        metrics::histogram!("bulwark_lb_failover_move_seconds").record(moved.as_secs_f64());

        let now = SystemTime::now();
        let ts = bulwark_api::time::timestamp_to_proto(now).ok();
        let dur = |d: Duration| bulwark_api::time::duration_to_proto(d).ok();
        let cmd = command(
            now,
            pb::command::Command::RecordVipHolder(pb::RecordVipHolder {
                node_id: self.node_id,
                term,
                since: ts,
                failover: Some(pb::FailoverRecord {
                    at: ts,
                    from_node_id: from,
                    to_node_id: self.node_id,
                    term,
                    cause: cause as i32,
                    time_to_detect: detect.and_then(dur),
                    time_to_move_vip: dur(moved),
                }),
            }),
        );
        let raft = self.raft.clone();
        let node_id = self.node_id;
        tokio::spawn(async move {
            // A proposal can fail while this node still leads the term (a
            // partition healing under it); the committed holder would then
            // name the previous holder for good. Propose again until it
            // commits or the term is no longer ours (the next leader
            // records itself).
            while let Err(e) = raft.client_write(cmd.clone()).await {
                let ours = crate::raft::leader_term(
                    &raft.server_metrics().borrow_watched(),
                    &raft.data_metrics().borrow_watched(),
                    node_id,
                ) == Some(term);
                if !ours {
                    tracing::warn!(term, error = %e, "could not record the VIP holder; no longer leading this term");
                    return;
                }
                tracing::warn!(term, error = %e, "could not record the VIP holder; proposing again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}
