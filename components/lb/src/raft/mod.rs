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
pub mod server;
pub mod state;
pub mod store;
pub mod timers;
pub mod types;

pub use types::{Cmd, CmdResult, LbNode, NodeId, Raft, TypeConfig};

/// Whether Raft's metrics say `node_id` leads: in the leader state and
/// itself the leader it knows.
pub fn leads(m: &openraft::RaftMetrics<TypeConfig>, node_id: NodeId) -> bool {
    m.state == openraft::ServerState::Leader && m.current_leader == Some(node_id)
}
