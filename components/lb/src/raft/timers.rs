//! The fence timers the other nodes run, learnt from the Raft RPCs.
//!
//! A new leader's claim must wait out the old holder's hold, less the lease
//! its voters waited ([`crate::vip::fence`]): both are other nodes' timers.
//! Assuming they are its own is wrong whenever the nodes' configs differ (a
//! rolling change of `vip.lease` or `raft.electionTimeoutMax`, one node
//! configured by hand), and two nodes could then hold the VIP at once. So
//! every Raft request and answer carries, in the [`HEADER`], the sender's
//! own [`NodeTimers`] and those it heard first-hand from its peers; a claim
//! counts the longest hold and the shortest lease this table knows of
//! ([`PeerTimers::cluster`]).
//!
//! The second-hand entries are for a node that has just restarted and wins
//! an election without ever hearing from the old holder: the voters that
//! followed it vouch for its timers. An entry is forgotten once it has not
//! been heard of for [`keep`], far longer than any node can hold the VIP
//! after it was last heard from.
//!
//! A node whose peers run other timers than its own says so: a warning
//! when it learns of them, and `bulwark_lb_fence_peers_differing` and
//! `bulwark_lb_fence_claim_delay_seconds` on every scrape.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::types::NodeId;
use crate::vip::fence::{FenceTiming, NodeTimers};

/// Request and response header: `id:hold_us:lease_us` per node, comma
/// separated, the sender first.
pub const HEADER: &str = "bulwark-fence-timers";

/// Entries read from one header at most (a cluster has a handful).
const MAX_ENTRIES: usize = 64;

/// The longest hold a valid config gives: `vip.lease` 60 s and
/// `checkInterval` 1 s on a clock that may run 50 % slow, plus a
/// `releaseBudget` of 10 s. A header saying more is malformed (it would
/// keep every claim waiting).
const MAX_HOLD: Duration = Duration::from_secs(132);

/// The range of a valid `raft.electionTimeoutMax`.
const LEASE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(20)..=Duration::from_secs(60);

/// How long an entry is kept after it was last heard of: a minute, or
/// twice the node's hold if that is longer. A node's hold bounds how long
/// it may keep the VIP after the last heartbeat a quorum acknowledged, and
/// its timers travel on those heartbeats.
fn keep(timers: &NodeTimers) -> Duration {
    (timers.hold * 2).max(Duration::from_secs(60))
}

/// One entry of the table: a node's timers as this node learnt them.
#[derive(Clone, Copy, Debug)]
struct Learnt {
    timers: NodeTimers,
    /// Heard from the node itself (else from a peer that did).
    first_hand: bool,
    at: Instant,
}

/// This node's timers and those it learnt of its peers.
#[derive(Debug)]
pub struct PeerTimers {
    me: NodeId,
    timing: FenceTiming,
    own: NodeTimers,
    heard: Mutex<BTreeMap<NodeId, Learnt>>,
}

impl PeerTimers {
    /// The table of node `me`, which runs `timing`.
    pub fn new(me: NodeId, timing: &FenceTiming) -> Self {
        Self {
            me,
            timing: *timing,
            own: whole_micros(timing.own()),
            heard: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Learnt>> {
        self.heard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts the [`HEADER`] on an outgoing request or answer.
    pub fn tell(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if let Ok(v) = tonic::metadata::MetadataValue::try_from(self.header(Instant::now())) {
            metadata.insert(HEADER, v);
        }
    }

    /// Records the [`HEADER`] of a peer's request or answer, if it has one.
    pub fn learn(&self, metadata: &tonic::metadata::MetadataMap) {
        if let Some(v) = metadata.get(HEADER).and_then(|v| v.to_str().ok()) {
            self.record(v, Instant::now());
        }
    }

    /// The header to send at `now`: our timers, then the peers' heard
    /// first-hand and not yet forgotten.
    fn header(&self, now: Instant) -> String {
        let mut out = entry(self.me, self.own);
        for (id, h) in self.lock().iter() {
            if h.first_hand && fresh(h, now) {
                out.push(',');
                out.push_str(&entry(*id, h.timers));
            }
        }
        out
    }

    /// Records a peer's header received at `now`. A malformed one is
    /// ignored as a whole (and said at debug level): the peer then counts
    /// as one that sent none, an older version whose timers are unknown.
    fn record(&self, value: &str, now: Instant) {
        let entries = match parse(value) {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(
                    header = value,
                    error = e,
                    "ignoring a malformed {HEADER} header"
                );
                return;
            }
        };
        let mut heard = self.lock();
        for (i, (id, timers)) in entries.into_iter().enumerate() {
            if id == self.me {
                continue;
            }
            let first_hand = i == 0;
            let previous = heard.get(&id).copied();
            // A second-hand report never overrides what the node told us
            // itself, unless that is forgotten.
            if !first_hand && previous.is_some_and(|p| p.first_hand && fresh(&p, now)) {
                continue;
            }
            if timers != self.own && previous.is_none_or(|p| p.timers != timers) {
                self.warn_differ(id, timers, first_hand);
            }
            heard.insert(
                id,
                Learnt {
                    timers,
                    first_hand,
                    at: now,
                },
            );
        }
    }

    fn warn_differ(&self, id: NodeId, timers: NodeTimers, first_hand: bool) {
        let delay = self.timing.claim_delay(false, self.own.worst(timers));
        tracing::warn!(
            peer = id,
            peer_hold_ms = ms(timers.hold),
            peer_election_timeout_max_ms = ms(timers.lease),
            hold_ms = ms(self.own.hold),
            election_timeout_max_ms = ms(self.own.lease),
            claim_delay_ms = ms(delay),
            heard_from = if first_hand { "the node" } else { "a peer" },
            "node {id} runs other fence timers (vip.lease, vip.checkInterval, vip.clockDrift, \
             vip.releaseBudget, raft.electionTimeoutMax) than this one; a new leader claims the \
             VIP only after the longest hold, so failovers may take longer: set the same timers \
             on every node"
        );
    }

    /// The longest hold and the shortest lease among this node and the
    /// peers not yet forgotten at `now`.
    pub fn cluster(&self, now: Instant) -> NodeTimers {
        self.lock()
            .values()
            .filter(|h| fresh(h, now))
            .fold(self.own, |worst, h| worst.worst(h.timers))
    }

    /// This node's timers and those of the peers known at `now`.
    pub fn known(&self, now: Instant) -> BTreeMap<NodeId, NodeTimers> {
        let mut out: BTreeMap<NodeId, NodeTimers> = self
            .lock()
            .iter()
            .filter(|(_, h)| fresh(h, now))
            .map(|(id, h)| (*id, h.timers))
            .collect();
        out.insert(self.me, self.own);
        out
    }

    /// How many peers known at `now` run other timers than this node.
    pub fn differing(&self, now: Instant) -> usize {
        self.lock()
            .values()
            .filter(|h| fresh(h, now) && h.timers != self.own)
            .count()
    }

    /// What a new leader waits after a normal election now.
    pub fn claim_delay(&self, now: Instant) -> Duration {
        self.timing.claim_delay(false, self.cluster(now))
    }
}

impl bulwark_common::telemetry::scrape::Publish for PeerTimers {
    fn publish(&self) {
        let now = Instant::now();
        metrics::gauge!("bulwark_lb_fence_peers_differing").set(self.differing(now) as f64);
        metrics::gauge!("bulwark_lb_fence_claim_delay_seconds")
            .set(self.claim_delay(now).as_secs_f64());
    }
}

fn fresh(h: &Learnt, now: Instant) -> bool {
    now.saturating_duration_since(h.at) < keep(&h.timers)
}

/// `t` as the header carries it, in whole microseconds: the hold rounded
/// up, the lease down (so a claim never waits less), and the same on every
/// node of the same config, so identical nodes compare equal.
fn whole_micros(t: NodeTimers) -> NodeTimers {
    let micros = |d: Duration| Duration::from_micros(d.as_micros() as u64);
    let hold = micros(t.hold);
    NodeTimers {
        hold: if hold < t.hold {
            hold + Duration::from_micros(1)
        } else {
            hold
        },
        lease: micros(t.lease),
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn entry(id: NodeId, t: NodeTimers) -> String {
    format!("{id}:{}:{}", t.hold.as_micros(), t.lease.as_micros())
}

fn parse(value: &str) -> Result<Vec<(NodeId, NodeTimers)>, &'static str> {
    let mut out = Vec::new();
    for e in value.split(',') {
        if out.len() == MAX_ENTRIES {
            return Err("too many entries");
        }
        let mut parts = e.trim().split(':').map(str::parse::<u64>);
        let (Some(Ok(id)), Some(Ok(hold)), Some(Ok(lease)), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("an entry is not id:hold_us:lease_us");
        };
        let timers = NodeTimers {
            hold: Duration::from_micros(hold),
            lease: Duration::from_micros(lease),
        };
        if timers.hold > MAX_HOLD || !LEASE_RANGE.contains(&timers.lease) {
            return Err("a hold or lease no valid config gives");
        }
        out.push((id, timers));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(lease_ms: u64, election_max_ms: u64) -> FenceTiming {
        FenceTiming {
            lease: Duration::from_millis(lease_ms),
            check_interval: Duration::from_millis(10),
            clock_drift: 0.01,
            release_budget: Duration::from_millis(25),
            follower_lease: Duration::from_millis(election_max_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn identical_nodes_change_nothing() {
        let t = timing(150, 220);
        let (a, b) = (PeerTimers::new(1, &t), PeerTimers::new(2, &t));
        let now = Instant::now();
        b.record(&a.header(now), now);
        a.record(&b.header(now), now);
        assert_eq!(a.cluster(now), whole_micros(t.own()));
        assert_eq!(a.differing(now), 0);
        assert_eq!(a.claim_delay(now), Duration::ZERO);
        assert_eq!(
            a.header(now),
            "1:186617:220000,2:186617:220000",
            "(150 + 10) / 0.99 + 25 = 186.6162 ms, rounded up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_longer_hold_elsewhere_delays_claims_until_forgotten() {
        let new = timing(150, 220);
        let old = timing(180, 250);
        let (a, b) = (PeerTimers::new(1, &new), PeerTimers::new(2, &old));
        let now = Instant::now();
        a.record(&b.header(now), now);
        let cluster = a.cluster(now);
        assert_eq!(cluster.hold, whole_micros(old.own()).hold);
        assert_eq!(cluster.lease, new.follower_lease);
        // (180 + 10) / 0.99 + 25 = 216.9 ms, times 1.01 = 219.1 ms: still
        // under the shortest voter lease, 220 ms.
        assert_eq!(a.claim_delay(now), Duration::ZERO);
        let longer = timing(300, 250);
        let c = PeerTimers::new(3, &longer);
        a.record(&c.header(now), now);
        let delay = a.claim_delay(now);
        let expected = whole_micros(longer.own()).hold.mul_f64(1.01) - Duration::from_millis(220);
        assert_eq!(delay, expected);
        assert!(delay > Duration::from_millis(120), "{delay:?}");
        assert_eq!(a.differing(now), 2);
        let later = now + Duration::from_secs(61);
        assert_eq!(
            a.cluster(later),
            whole_micros(new.own()),
            "forgotten after a minute"
        );
        assert_eq!(a.differing(later), 0);
        assert_eq!(a.header(later), entry(1, whole_micros(new.own())));
    }

    #[tokio::test(start_paused = true)]
    async fn second_hand_entries_reach_a_node_that_never_heard_the_holder() {
        let t = timing(150, 220);
        let slow = timing(400, 600);
        let (a, b, c) = (
            PeerTimers::new(1, &slow),
            PeerTimers::new(2, &t),
            PeerTimers::new(3, &t),
        );
        let now = Instant::now();
        // B heard A (its leader); C just restarted and hears only B.
        b.record(&a.header(now), now);
        c.record(&b.header(now), now);
        assert_eq!(c.cluster(now).hold, whole_micros(slow.own()).hold);
        // C repeats only what it heard first-hand: nothing of A's.
        let own = whole_micros(t.own());
        assert_eq!(
            c.header(now),
            format!("{},{}", entry(3, own), entry(2, own))
        );
        // What A says itself wins over what B said of it, and a stale
        // second-hand report does not override it.
        let a_now = PeerTimers::new(1, &t);
        c.record(&a_now.header(now), now);
        c.record(&b.header(now), now);
        assert_eq!(c.cluster(now), own);
    }

    #[test]
    fn malformed_headers_are_ignored() {
        let t = timing(150, 220);
        let a = PeerTimers::new(1, &t);
        let now = Instant::now();
        let too_long = "2:132000001:220000";
        let no_lease = "2:186617:0";
        for bad in [
            "", "2", "2:1", "2:1:x", "2:1:2:3", "2:1:2,,", "-1:2:3", too_long, no_lease,
        ] {
            a.record(bad, now);
            assert_eq!(a.cluster(now), whole_micros(t.own()), "{bad:?}");
        }
        let many = vec!["2:1:20000"; MAX_ENTRIES + 1].join(",");
        assert!(parse(&many).is_err());
        a.record("2:900000:100000", now);
        assert_eq!(a.differing(now), 1);
        // Our own id in a peer's header is ignored.
        let b = PeerTimers::new(2, &t);
        b.record("1:900000:100000,2:900000:100000", now);
        assert_eq!(b.differing(now), 1);
        assert_eq!(b.cluster(now).hold, Duration::from_millis(900));
        // The longest hold a valid config gives is taken.
        b.record("3:132000000:60000000", now);
        assert_eq!(b.cluster(now).hold, MAX_HOLD);
    }
}
