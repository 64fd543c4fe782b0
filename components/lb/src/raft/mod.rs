//! Consensus: the Raft group of bulwark-lb nodes (openraft), which elects
//! the VIP holder and replicates the backend registry.
//!
//! - [`types`]: openraft's type configuration for bulwark-lb: node ids,
//!   [`LbNode`], the command payload.
//! - [`convert`]: openraft types <-> `bulwark.raft.v1` protobuf, used on the
//!   wire and on disk alike.
//! - [`store`]: the durable log, vote, committed index and state machine
//!   (one redb file, fsync on every commit).
//! - [`state`]: the replicated state itself and the deterministic apply.
//! - [`network`]: the Raft client (RaftNetworkV2 over mTLS gRPC).
//! - [`server`]: the Raft gRPC service, with the guards that keep a wiped
//!   or just-restarted node from voting too early.
//! - [`membership`]: bootstrap from the initial members and the join
//!   handshake that admits a node with an empty data dir.
//! - [`timers`]: the fence timers each peer runs, carried on every Raft
//!   request and answer, so a claim waits out the longest hold in the
//!   cluster, not this node's.
//! - [`elector`]: a follower's campaign the moment the silent leader's lease
//!   runs out, instead of one election timeout after openraft's first,
//!   refused, attempt.

pub mod convert;
pub mod elector;
pub mod membership;
pub mod network;
pub mod seed;
pub mod server;
pub mod state;
pub mod store;
pub mod timers;
pub mod types;

pub use types::{Cmd, CmdResult, LbNode, NodeId, Raft, TypeConfig};

/// openraft's server metrics: role, leader, vote (as flushed) and membership.
pub type ServerMetrics = openraft::metrics::RaftServerMetrics<TypeConfig>;

/// openraft's data metrics: logs, and a leader's replication progress and
/// last quorum acknowledgement.
pub type DataMetrics = openraft::metrics::RaftDataMetrics<TypeConfig>;

/// Whether Raft's metrics say `node_id` leads: in the leader state and
/// itself the leader it knows.
pub fn leads(m: &openraft::RaftMetrics<TypeConfig>, node_id: NodeId) -> bool {
    is_leader(m.state, m.current_leader, node_id)
}

/// The term `node_id` leads, from Raft's server metrics (which change only
/// on a change of role, leader, vote or membership) and data metrics: the
/// leader state, itself the leader it knows, its own committed vote on
/// disk, and data metrics that come from a leader too.
///
/// - The vote in the server metrics is the flushed one, so a leader whose
///   committed vote is still being written is not leading yet; the flush
///   changes the metrics.
/// - openraft sends the data metrics first, then the server metrics: data
///   metrics without replication progress (a leader's only) next to server
///   metrics that still say leader mean the node has just stepped down, and
///   the server metrics are about to say so.
pub fn leader_term(server: &ServerMetrics, data: &DataMetrics, node_id: NodeId) -> Option<u64> {
    let vote = &server.vote;
    let ours = server_leads(server, node_id)
        && vote.committed
        && vote.leader_id.node_id == node_id
        && data.replication.is_some();
    ours.then_some(vote.leader_id.term)
}

/// [`leads`] from Raft's server metrics, which change only on a change of
/// role, leader, vote or membership (the full metrics are sent again after
/// every message Raft's core handles).
pub fn server_leads(m: &ServerMetrics, node_id: NodeId) -> bool {
    is_leader(m.state, m.current_leader, node_id)
}

/// The one leadership rule of both metrics.
fn is_leader(state: openraft::ServerState, leader: Option<NodeId>, node_id: NodeId) -> bool {
    state == openraft::ServerState::Leader && leader == Some(node_id)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::ServerState;

    use super::*;

    fn server(state: ServerState, leader: Option<NodeId>, vote: types::Vote) -> ServerMetrics {
        ServerMetrics {
            id: 1,
            vote,
            state,
            current_leader: leader,
            membership_config: Arc::default(),
            committed_membership_config: Arc::default(),
        }
    }

    #[test]
    fn a_node_leads_the_term_of_its_own_committed_vote_on_disk() {
        let from_leader = DataMetrics {
            replication: Some(Default::default()),
            ..Default::default()
        };
        let term = |state, leader, vote| leader_term(&server(state, leader, vote), &from_leader, 1);
        assert_eq!(
            term(
                ServerState::Leader,
                Some(1),
                types::Vote::new_committed(7, 1)
            ),
            Some(7)
        );
        // Elected, but the committed vote is still being written: the
        // flushed one is the candidate's.
        assert_eq!(
            term(ServerState::Leader, Some(1), types::Vote::new(7, 1)),
            None
        );
        // Elected before an older vote for another node reached the disk.
        assert_eq!(
            term(
                ServerState::Leader,
                Some(1),
                types::Vote::new_committed(6, 2)
            ),
            None
        );
        assert_eq!(
            term(
                ServerState::Follower,
                Some(2),
                types::Vote::new_committed(7, 2)
            ),
            None
        );
        // A stepped-down leader that has not learnt the new leader yet.
        assert_eq!(
            term(
                ServerState::Follower,
                None,
                types::Vote::new_committed(7, 1)
            ),
            None
        );
        // Stepped down between the two sends: the data metrics already
        // come from a follower, the server metrics not yet.
        let leading = server(
            ServerState::Leader,
            Some(1),
            types::Vote::new_committed(7, 1),
        );
        assert_eq!(leader_term(&leading, &DataMetrics::default(), 1), None);
    }
}
