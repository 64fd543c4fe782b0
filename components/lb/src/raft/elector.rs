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
//! out, `step` apart) so two of them rarely split the vote. Each follower
//! tries twice in its turn, at its start and half a turn later: on a busy
//! machine the other voters may have accepted the last heartbeat a few
//! milliseconds after this node did, so their leases run out a little later
//! and the first pre-vote is refused. If a follower cannot win at all (its
//! log is behind, or it is cut off) the next one tries in its own turn.
//! Once per silence: a new append from any leader starts a new one, and so
//! does a vote this follower grants. As in Raft, granting a vote restarts
//! the wait: the candidate is about to lead, and its first append can be
//! tens of milliseconds away on a busy machine (its vote and its blank
//! entry are written to disk first). Counting from the old leader's last
//! append instead, the next follower's turn came while that candidate was
//! still collecting votes; its pre-vote found the candidate's own vote not
//! yet committed and was granted, and the two elections could cancel each
//! other out until openraft's own timer, hundreds of milliseconds later
//! (a failover bench trial took 503 ms to detect). A silence from an older
//! term than the node's own is over: a leader that has just stepped down
//! for a newer one waits for that leader's first append instead of
//! campaigning on the silence from before it led.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::server::{Heard, Signals};
use super::types::{NodeId, Raft};

/// Margin after the lease: the voters' leases started when they accepted
/// the same heartbeat, a little after this node's on a busy machine.
const MARGIN: Duration = Duration::from_millis(5);

/// Attempts per follower turn, half a turn apart.
const TRIES_PER_TURN: u32 = 2;

/// Pause when there is nothing to wait for (no leader heard yet, or this
/// silence already had its attempts).
const IDLE: Duration = Duration::from_millis(20);

/// When this follower should campaign for the silence that began at the
/// last append it accepted, or `None` when it should not.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    /// Not a follower of a known leader, not a voter, or this silence
    /// already had this follower's attempts.
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
    // The silence (its last contact) being campaigned in, and how many
    // attempts it has had.
    let mut tried: Option<(Instant, u32)> = None;
    let attempts_in = |tried: Option<(Instant, u32)>, at: Instant| {
        tried.filter(|(t, _)| *t == at).map_or(0, |(_, n)| n)
    };
    loop {
        let silence = silence(&signals);
        let due = match silence {
            Some(s) => due(&raft, me, s, lease, step, attempts_in(tried, s.at)),
            None => Due::Never,
        };
        let wake = match due {
            Due::At(when) if when <= Instant::now() => {
                if let Some(s) = silence {
                    tried = Some((s.at, attempts_in(tried, s.at) + 1));
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

/// The silence this follower is in: since the leader's last append it
/// accepted, or since the vote it last granted if that came later (with the
/// candidate in the leader's place).
fn silence(signals: &Signals) -> Option<Heard> {
    later(signals.last_append(), signals.last_granted())
}

/// The later of two events, either of which may be absent (`a` on a tie:
/// `max_by_key` keeps the last of equal ones).
fn later(a: Option<Heard>, b: Option<Heard>) -> Option<Heard> {
    b.into_iter().chain(a).max_by_key(|h| h.at)
}

fn due(
    raft: &Raft,
    me: NodeId,
    silence: Heard,
    lease: Duration,
    step: Duration,
    attempts: u32,
) -> Due {
    let m = raft.metrics().borrow_watched().clone();
    // A candidate's vote is under way: another attempt would start over
    // with a higher term.
    if matches!(m.state, ServerState::Leader | ServerState::Candidate) || silence.from == me {
        return Due::Never;
    }
    // This node has moved on to a newer term than the silence's: a leader
    // that has just stepped down for a newer one, whose first append the
    // server has not recorded yet. Its silence from before it led is long
    // over; the new leader's append starts the next one.
    if m.current_term > silence.term {
        return Due::Never;
    }
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    match turn(&voters, me, silence.from) {
        Some(rank) => attempt_at(silence.at, lease, step, rank, attempts),
        None => Due::Never,
    }
}

/// When the follower of turn `rank` makes its attempt number `attempts`
/// (from 0) for the silence that began at `at`.
fn attempt_at(at: Instant, lease: Duration, step: Duration, rank: u32, attempts: u32) -> Due {
    if attempts >= TRIES_PER_TURN {
        return Due::Never;
    }
    Due::At(at + lease + MARGIN + step * rank + step / TRIES_PER_TURN * attempts)
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

    #[test]
    fn a_vote_granted_after_the_last_append_starts_the_silence() {
        let start = Instant::now();
        let heard = |ms, from, term| Heard {
            at: start + Duration::from_millis(ms),
            from,
            term,
        };
        // The old leader 1's last append, then a vote for candidate 2: the
        // silence is the candidate's, from the vote on.
        let (append, vote) = (heard(0, 1, 4), heard(230, 2, 5));
        assert_eq!(later(Some(append), Some(vote)), Some(vote));
        // An append from the new leader after the vote: the leader's.
        let next = heard(250, 2, 5);
        assert_eq!(later(Some(next), Some(vote)), Some(next));
        // A vote from an earlier election does not bring back its silence.
        assert_eq!(later(Some(next), Some(heard(100, 3, 3))), Some(next));
        assert_eq!(later(None, Some(vote)), Some(vote));
        assert_eq!(later(Some(append), None), Some(append));
        assert_eq!(later(None, None), None);
    }

    #[test]
    fn each_turn_has_two_attempts_half_a_turn_apart() {
        let at = Instant::now();
        let lease = Duration::from_millis(250);
        let step = Duration::from_millis(50);
        let when = |rank, n| match attempt_at(at, lease, step, rank, n) {
            Due::At(w) => Some(w - at),
            Due::Never => None,
        };
        assert_eq!(when(0, 0), Some(Duration::from_millis(255)));
        assert_eq!(when(0, 1), Some(Duration::from_millis(280)));
        assert_eq!(when(0, 2), None);
        // The next follower's turn begins after both of the first one's.
        assert_eq!(when(1, 0), Some(Duration::from_millis(305)));
        assert_eq!(when(1, 1), Some(Duration::from_millis(330)));
    }
}
