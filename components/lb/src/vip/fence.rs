//! The fencing rule: when this node may hold the VIP.
//!
//! A node holds the VIP only while (1) it is the Raft leader, (2) the last
//! heartbeat a quorum acknowledged was *sent* less than `lease` ago, and
//! (3) since it won its election, long enough has passed that any previous
//! holder has released ([`FenceTiming::claim_delay`]). The argument that
//! these make two holders impossible, and the choice of defaults, is in
//! docs/FAILOVER.md; this module is its executable form.
//!
//! Nodes need not run the same timers (a rolling change of them, one node
//! configured by hand): a claim waits out the longest hold and counts the
//! shortest voter lease of any node this one knows of
//! ([`crate::raft::timers`]), not its own.
//!
//! [`Fence`] is pure: it is fed the leader's view and the time, and says
//! claim, release or nothing. The VIP task calls it every `checkInterval`
//! (openraft reports nothing while a partitioned leader waits for acks, so
//! waiting for metric changes alone would hold a stale lease forever) and
//! on every change of role, leader, vote or membership (and, while it
//! leads, of quorum acknowledgements). Tested with paused Tokio time.

use std::time::Duration;

use tokio::time::Instant;

/// The timers that decide holding and claiming.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FenceTiming {
    /// Hold only while the last quorum-acknowledged heartbeat was sent less
    /// than this long ago.
    pub lease: Duration,
    /// How often the holder re-checks its lease.
    pub check_interval: Duration,
    /// Bound on relative clock rate error between nodes (fraction).
    pub clock_drift: f64,
    /// Time to remove the address or close the listener once decided.
    pub release_budget: Duration,
    /// openraft's follower lease (`electionTimeoutMax`): a voter grants no
    /// vote (except for a leadership transfer) for this long after it last
    /// accepted a heartbeat, and, with our start-up guard, after it starts.
    pub follower_lease: Duration,
}

/// The two timers of one node that another node's claim depends on; or,
/// for a whole cluster, the longest hold and the shortest lease among its
/// nodes ([`NodeTimers::worst`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeTimers {
    /// [`FenceTiming::max_hold_after_ack`]: how long the node may keep the
    /// VIP after the send time of its last quorum-acknowledged heartbeat.
    pub hold: Duration,
    /// Its follower lease (`electionTimeoutMax`): how long, as a voter, it
    /// grants no vote after a heartbeat.
    pub lease: Duration,
}

impl NodeTimers {
    /// The pair a claim must respect when `self` and `other` may both be
    /// in the cluster: the longer hold, the shorter lease.
    pub fn worst(self, other: NodeTimers) -> NodeTimers {
        NodeTimers {
            hold: self.hold.max(other.hold),
            lease: self.lease.min(other.lease),
        }
    }
}

impl FenceTiming {
    /// This node's own [`NodeTimers`].
    pub fn own(&self) -> NodeTimers {
        NodeTimers {
            hold: self.max_hold_after_ack(),
            lease: self.follower_lease,
        }
    }

    /// Longest real time a holder may keep the VIP after the send time of
    /// its last quorum-acknowledged heartbeat: its lease and one check
    /// interval on a clock that may run slow, plus the removal itself.
    pub fn max_hold_after_ack(&self) -> Duration {
        (self.lease + self.check_interval).div_f64(1.0 - self.clock_drift) + self.release_budget
    }

    /// How long a new leader waits after winning before it claims, on its
    /// own clock, in a cluster whose longest hold and shortest follower
    /// lease are `cluster` (with identical nodes: [`FenceTiming::own`]).
    ///
    /// After a normal election, every voter in the winning quorum waited
    /// its follower lease (on its clock, possibly fast) after the last
    /// heartbeat it acknowledged, and some voter of that quorum is in the
    /// quorum that acknowledged the old holder's last lease heartbeat. So
    /// the old holder's last acknowledged send time precedes the election by
    /// at least `cluster.lease / (1 + drift)`, and only the rest of its
    /// hold remains. After a leadership transfer voters skip that wait, so
    /// the whole hold is waited out. Our clock may run fast, hence the
    /// final `(1 + drift)`.
    pub fn claim_delay(&self, after_transfer: bool, cluster: NodeTimers) -> Duration {
        let hold = cluster.hold.mul_f64(1.0 + self.clock_drift);
        if after_transfer {
            hold
        } else {
            hold.saturating_sub(cluster.lease)
        }
    }
}

/// What the leader knows about itself at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderView {
    /// `Some(term)` while this node is the leader of `term`.
    pub leader_term: Option<u64>,
    /// Send time of the last heartbeat a quorum acknowledged (openraft's
    /// `last_quorum_acked`), while leader.
    pub last_quorum_acked: Option<Instant>,
    /// The longest hold and shortest follower lease among the nodes known
    /// now, this one included.
    pub cluster: NodeTimers,
}

/// Why the VIP was released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    /// No quorum acknowledged a heartbeat within the lease.
    LeaseExpired,
    /// Another node leads now (or nobody does).
    LostLeadership,
    /// Leadership is being handed over (transfer or shutdown).
    Handover,
}

impl ReleaseReason {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::LeaseExpired => "lease_expired",
            ReleaseReason::LostLeadership => "lost_leadership",
            ReleaseReason::Handover => "handover",
        }
    }
}

/// What the caller must do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing changes.
    None,
    /// Take the VIP (for `term`).
    Claim {
        /// The term this node leads.
        term: u64,
        /// When this node was first seen as leader of the term.
        elected_at: Instant,
        /// Whether the election followed a leadership transfer.
        after_transfer: bool,
    },
    /// Give the VIP up.
    Release(ReleaseReason),
}

/// The fencing state of one node.
#[derive(Debug)]
pub struct Fence {
    timing: FenceTiming,
    /// The term we lead, when we first saw it, and whether it came from a
    /// transfer.
    leading: Option<(u64, Instant, bool)>,
    holding: bool,
    /// Terms up to this one never claim again (handed over, or shutting
    /// down when `u64::MAX`).
    fenced_through: Option<u64>,
}

impl Fence {
    /// A node that holds nothing.
    pub fn new(timing: FenceTiming) -> Self {
        Self {
            timing,
            leading: None,
            holding: false,
            fenced_through: None,
        }
    }

    /// The timers.
    pub fn timing(&self) -> &FenceTiming {
        &self.timing
    }

    /// Whether the caller holds the VIP (as far as the fence knows).
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// Time left on the lease, while holding.
    pub fn lease_remaining(&self, view: &LeaderView, now: Instant) -> Option<Duration> {
        if !self.holding {
            return None;
        }
        view.last_quorum_acked
            .map(|acked| (acked + self.timing.lease).saturating_duration_since(now))
    }

    /// Decides at `now`. `transfer_seen` tells whether this node accepted a
    /// leadership transfer recently (before its election).
    pub fn decide(&mut self, view: &LeaderView, now: Instant, transfer_seen: bool) -> Action {
        // Track the term we lead and when we first saw it: the claim delay
        // counts from there (seeing it late only makes us wait longer).
        match view.leader_term {
            Some(term) if self.leading.map(|l| l.0) != Some(term) => {
                self.leading = Some((term, now, transfer_seen));
            }
            Some(_) => {}
            None => self.leading = None,
        }

        let fresh = view
            .last_quorum_acked
            .is_some_and(|acked| now < acked + self.timing.lease);
        if self.holding {
            return match self.leading {
                None => {
                    self.holding = false;
                    Action::Release(ReleaseReason::LostLeadership)
                }
                Some((term, _, _)) if self.fenced_through.is_some_and(|f| term <= f) => {
                    self.holding = false;
                    Action::Release(ReleaseReason::Handover)
                }
                Some(_) if !fresh => {
                    self.holding = false;
                    Action::Release(ReleaseReason::LeaseExpired)
                }
                Some(_) => Action::None,
            };
        }
        match self.leading {
            Some((term, elected_at, after_transfer))
                if fresh
                    && self.fenced_through.is_none_or(|f| term > f)
                    && now
                        >= elected_at + self.timing.claim_delay(after_transfer, view.cluster) =>
            {
                self.holding = true;
                Action::Claim {
                    term,
                    elected_at,
                    after_transfer,
                }
            }
            _ => Action::None,
        }
    }

    /// The claim could not be carried out (address busy, netlink error):
    /// the next decision tries again.
    pub fn claim_failed(&mut self) {
        self.holding = false;
    }

    /// Never claim again in `term` or earlier: this node is handing
    /// leadership over. Returns whether the caller must release now.
    pub fn fence_through(&mut self, term: u64) -> bool {
        self.fenced_through = Some(self.fenced_through.map_or(term, |f| f.max(term)));
        std::mem::take(&mut self.holding)
    }

    /// Never claim again (shutdown). Returns whether the caller must
    /// release now.
    pub fn fence_forever(&mut self) -> bool {
        self.fence_through(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> FenceTiming {
        FenceTiming {
            lease: Duration::from_millis(180),
            check_interval: Duration::from_millis(10),
            clock_drift: 0.01,
            release_budget: Duration::from_millis(25),
            follower_lease: Duration::from_millis(250),
        }
    }

    fn view(term: Option<u64>, acked: Option<Instant>) -> LeaderView {
        LeaderView {
            leader_term: term,
            last_quorum_acked: acked,
            cluster: timing().own(),
        }
    }

    #[test]
    fn claim_delay_follows_the_inequality() {
        let t = timing();
        // (180 + 10) / 0.99 + 25 = 216.9 ms, times 1.01 = 219.1 ms.
        let hold = t.max_hold_after_ack().mul_f64(1.01);
        assert!(hold > Duration::from_millis(219) && hold < Duration::from_millis(220));
        assert_eq!(
            t.claim_delay(false, t.own()),
            Duration::ZERO,
            "F = 250 ms needs no wait"
        );
        assert_eq!(t.claim_delay(true, t.own()), hold);
        let long = FenceTiming {
            lease: Duration::from_millis(400),
            ..t
        };
        assert!(long.claim_delay(false, long.own()) > Duration::from_millis(190));
    }

    #[test]
    fn the_default_timers_need_no_claim_delay_and_keep_their_slack() {
        let t = crate::config::VipConfig::default().timing(&crate::config::RaftConfig::default());
        // (150 + 10) / 0.99 + 25 = 186.6 ms, times 1.01 = 188.5 ms, against
        // F = 220 ms: the new leader claims at once, and a running old
        // holder has let go about 30 ms before the voters' lease ends.
        assert_eq!(t.claim_delay(false, t.own()), Duration::ZERO);
        let slack = t.follower_lease - t.max_hold_after_ack().mul_f64(1.0 + t.clock_drift);
        assert!(slack > Duration::from_millis(30), "{slack:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn holder_releases_when_acks_stop_even_without_news() {
        let mut f = Fence::new(timing());
        let t0 = Instant::now();
        assert_eq!(f.decide(&view(None, None), t0, false), Action::None);
        // Elected, but no quorum ack yet: wait.
        assert_eq!(f.decide(&view(Some(3), None), t0, false), Action::None);
        let acked = Instant::now();
        assert!(matches!(
            f.decide(&view(Some(3), Some(acked)), Instant::now(), false),
            Action::Claim { term: 3, .. }
        ));
        // Partitioned: the view stays the same (openraft still says
        // Leader); only time passes, in check-interval steps.
        let mut released_at = None;
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(10)).await;
            if let Action::Release(r) = f.decide(&view(Some(3), Some(acked)), Instant::now(), false)
            {
                assert_eq!(r, ReleaseReason::LeaseExpired);
                released_at = Some(Instant::now());
                break;
            }
        }
        let released_at = released_at.expect("released");
        let after = released_at - acked;
        assert!(after >= Duration::from_millis(180), "{after:?}");
        assert!(
            after <= Duration::from_millis(190),
            "within one check: {after:?}"
        );
        assert!(!f.holding());
        // A fresh ack in the same term makes it claimable again at once.
        let acked = Instant::now();
        assert!(matches!(
            f.decide(&view(Some(3), Some(acked)), Instant::now(), false),
            Action::Claim { term: 3, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_transfer_winner_waits_out_the_whole_hold() {
        let mut f = Fence::new(timing());
        let elected = Instant::now();
        let delay = timing().claim_delay(true, timing().own());
        assert_eq!(
            f.decide(&view(Some(9), Some(elected)), elected, true),
            Action::None
        );
        loop {
            tokio::time::advance(Duration::from_millis(10)).await;
            let now = Instant::now();
            // Keep the lease fresh: acks keep coming.
            match f.decide(&view(Some(9), Some(now)), now, true) {
                Action::Claim { after_transfer, .. } => {
                    assert!(after_transfer);
                    assert!(now - elected >= delay);
                    assert!(now - elected < delay + Duration::from_millis(10));
                    break;
                }
                Action::None => assert!(now - elected < delay),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_waits_out_the_longest_hold_among_the_nodes() {
        let mut f = Fence::new(timing());
        // A peer that holds for 300 ms after its last ack, and votes after
        // 220 ms: this node's own timers would claim at once.
        let peer = NodeTimers {
            hold: Duration::from_millis(300),
            lease: Duration::from_millis(220),
        };
        let cluster = timing().own().worst(peer);
        assert_eq!(cluster.hold, peer.hold);
        assert_eq!(cluster.lease, peer.lease);
        let delay = timing().claim_delay(false, cluster);
        // 300 ms × 1.01 − 220 ms.
        assert!(
            delay > Duration::from_millis(82) && delay < Duration::from_millis(84),
            "{delay:?}"
        );
        let elected = Instant::now();
        let at = |now| LeaderView {
            leader_term: Some(5),
            last_quorum_acked: Some(now),
            cluster,
        };
        assert_eq!(f.decide(&at(elected), elected, false), Action::None);
        tokio::time::advance(Duration::from_millis(80)).await;
        assert_eq!(
            f.decide(&at(Instant::now()), Instant::now(), false),
            Action::None
        );
        tokio::time::advance(Duration::from_millis(4)).await;
        assert!(matches!(
            f.decide(&at(Instant::now()), Instant::now(), false),
            Action::Claim { term: 5, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn losing_leadership_and_handover_release_and_fence() {
        let mut f = Fence::new(timing());
        let now = Instant::now();
        assert!(matches!(
            f.decide(&view(Some(2), Some(now)), now, false),
            Action::Claim { .. }
        ));
        assert_eq!(
            f.decide(&view(None, None), now, false),
            Action::Release(ReleaseReason::LostLeadership)
        );
        assert!(matches!(
            f.decide(&view(Some(4), Some(now)), now, false),
            Action::Claim { term: 4, .. }
        ));
        // Handing over: release now, never claim term 4 again.
        assert!(f.fence_through(4));
        assert_eq!(
            f.decide(&view(Some(4), Some(now)), now, false),
            Action::None
        );
        // A later term (transfer failed, re-elected normally) may claim.
        assert!(matches!(
            f.decide(&view(Some(5), Some(now)), now, false),
            Action::Claim { term: 5, .. }
        ));
        assert!(f.fence_forever());
        assert_eq!(
            f.decide(&view(Some(6), Some(now)), now, false),
            Action::None,
            "shutting down: never again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_failure_is_retried() {
        let mut f = Fence::new(timing());
        let now = Instant::now();
        assert!(matches!(
            f.decide(&view(Some(1), Some(now)), now, false),
            Action::Claim { .. }
        ));
        f.claim_failed();
        assert!(matches!(
            f.decide(&view(Some(1), Some(now)), now, false),
            Action::Claim { .. }
        ));
    }
}
