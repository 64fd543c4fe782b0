//! Campaigning the moment the leader's lease runs out.
//!
//! openraft starts a (pre-)vote when a follower has heard nothing from the
//! leader for its randomized election timeout, drawn from
//! `[electionTimeoutMin, electionTimeoutMax)`. Every voter refuses votes
//! until `electionTimeoutMax` (the follower lease, `F`) has passed since the
//! last heartbeat it accepted, and the fencing argument (docs/FAILOVER.md)
//! rests on that. So openraft's first attempt after a leader dies always
//! comes too early and is refused, and the candidate tries again only one
//! more election timeout later: measured, half a second from the last
//! heartbeat to a new leader with the 150–250 ms defaults.
//!
//! This task asks for the second attempt at the moment it can succeed: once
//! `F` (plus a small margin) has passed since this follower's last accepted
//! append, it triggers one pre-vote election. Pre-vote changes no term
//! unless a quorum would grant the vote, so a follower that is itself cut
//! off disturbs nobody. It fires only after `F` of silence, later than
//! openraft's own first attempt, so it adds no election a healthy leader
//! would see. The followers take turns (by node id, the old leader left
//! out, `step` apart) so two of them rarely split the vote; if the first
//! one cannot win (its log is behind, or it is cut off) the next one tries
//! `step` later. Once per silence: a new append from any leader starts a
//! new one.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::server::Signals;
use super::types::{NodeId, Raft};

/// Margin after the lease: the voters' leases started when they accepted
/// the same heartbeat, a little after this node's on a busy machine.
const MARGIN: Duration = Duration::from_millis(5);

/// Pause when there is nothing to wait for (no leader heard yet, or this
/// silence already had its attempt).
const IDLE: Duration = Duration::from_millis(20);

/// When this follower should campaign for the silence that began at the
/// last append it accepted, or `None` when it should not.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    /// Not a follower of a known leader, or not a voter.
    Never,
    /// At this instant.
    At(Instant),
}

/// The follower's turn: `rank`-th of the voters other than the silent
/// leader, in node-id order.
fn turn(voters: &[NodeId], me: NodeId, leader: NodeId) -> Option<u32> {
    let mut others: Vec<NodeId> = voters.iter().copied().filter(|v| *v != leader).collect();
    others.sort_unstable();
    others
        .iter()
        .position(|v| *v == me)
        .and_then(|p| u32::try_from(p).ok())
}

/// Campaigns at lease expiry until `cancel` fires.
pub async fn run(
    raft: Raft,
    me: NodeId,
    signals: Arc<Signals>,
    lease: Duration,
    step: Duration,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    // The silence (its last contact) that already had its attempt.
    let mut tried: Option<Instant> = None;
    loop {
        let due = match signals.last_contact() {
            Some((at, _)) if tried == Some(at) => Due::Never,
            Some((at, leader)) => due(&raft, me, leader, at, lease, step),
            None => Due::Never,
        };
        let wake = match due {
            Due::At(when) if when <= Instant::now() => {
                if let Some((at, _)) = signals.last_contact() {
                    tried = Some(at);
                }
                tracing::debug!(node = me, "leader lease ran out: campaigning (pre-vote)");
                if let Err(e) = raft.trigger().elect(true).await {
                    tracing::debug!(error = %e, "could not trigger an election");
                }
                Instant::now() + IDLE
            }
            Due::At(when) => when,
            Due::Never => Instant::now() + IDLE,
        };
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

fn due(
    raft: &Raft,
    me: NodeId,
    leader: NodeId,
    at: Instant,
    lease: Duration,
    step: Duration,
) -> Due {
    let m = raft.metrics().borrow_watched().clone();
    if m.state == ServerState::Leader || leader == me {
        return Due::Never;
    }
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    match turn(&voters, me, leader) {
        Some(rank) => Due::At(at + lease + MARGIN + step * rank),
        None => Due::Never,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_take_turns_in_node_id_order_without_the_leader() {
        assert_eq!(turn(&[3, 1, 2], 2, 1), Some(0));
        assert_eq!(turn(&[3, 1, 2], 3, 1), Some(1));
        assert_eq!(turn(&[3, 1, 2], 1, 2), Some(0));
        assert_eq!(turn(&[3, 1, 2], 3, 2), Some(1));
        // A learner (not a voter) never campaigns.
        assert_eq!(turn(&[1, 2, 3], 4, 1), None);
    }
}
