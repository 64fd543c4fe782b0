//! openraft's type configuration for bulwark-lb.
//!
//! Leader ids, votes, log ids and entries are openraft's defaults (a
//! committed leader id is `(term, node_id)`); only the payload and the node
//! record are ours. On the wire and on disk everything is protobuf
//! (`bulwark.raft.v1`, see [`super::convert`]), so the log stays readable
//! across openraft upgrades.

use std::fmt;

use bulwark_api::raft::v1 as pb;

use super::state::ApplyError;
use super::store::StateMachineStore;

/// A Raft node id: nonzero, unique, never reused.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// bulwark-lb's Raft types.
    pub TypeConfig:
        D = Cmd,
        R = CmdResult,
        NodeId = NodeId,
        Node = LbNode,
);

/// The Raft handle of a bulwark-lb node.
pub type Raft = openraft::Raft<TypeConfig, StateMachineStore>;

/// Which election a VoteRequest is for: both carry the same message, on
/// two RPCs, and both ends treat them alike but for this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ballot {
    /// A real vote, which can come from a leadership transfer.
    Vote,
    /// A pre-vote, which asks whether an election could be won.
    PreVote,
}

/// Where a member can be reached: openraft's node record, persisted in
/// every membership entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbNode {
    /// Host name.
    pub name: String,
    /// Raft service address, host:port.
    pub raft_address: String,
    /// bulwark.lb.v1 API address, host:port.
    pub api_address: String,
    /// Node-local proxy address; empty when none.
    pub proxy_address: String,
    /// Zone; empty when zones are not used.
    pub zone: String,
}

impl fmt::Display for LbNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.raft_address)
    }
}

/// A state machine command: the protobuf `Command` of the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Cmd(pub pb::Command);

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use pb::command::Command as C;
        match &self.0.command {
            Some(C::SetBackend(s)) => match &s.backend {
                Some(b) => write!(f, "set-backend({})", b.id),
                None => f.write_str("set-backend(?)"),
            },
            Some(C::RemoveBackend(r)) => write!(f, "remove-backend({})", r.id),
            Some(C::SetAdminState(s)) => write!(f, "set-admin-state({}, {})", s.id, s.admin_state),
            Some(C::ApplyVerdicts(v)) => write!(f, "apply-verdicts({})", v.changes.len()),
            Some(C::RecordVipHolder(r)) => {
                write!(f, "record-vip-holder({}, T{})", r.node_id, r.term)
            }
            Some(C::SeedBackends(s)) => write!(f, "seed-backends({})", s.backends.len()),
            Some(C::Noop(_)) => f.write_str("noop"),
            None => f.write_str("empty"),
        }
    }
}

/// What applying one command did, returned to its proposer. Apply never
/// fails the log: a command that does not fit the state (a backend removed
/// concurrently, say) is answered with the reason and changes nothing.
pub type CmdResult = Result<(), ApplyError>;

/// openraft's log id for our types.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// openraft's vote for our types.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// openraft's leader id for our types.
pub type LeaderId = openraft::type_config::alias::LeaderIdOf<TypeConfig>;
/// openraft's log entry for our types.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A membership configuration.
pub type Membership = openraft::Membership<NodeId, LbNode>;
/// A membership with the log id that introduced it.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot: its meta and the encoded `StateMachineData`. The state is
/// small (a registry of apiservers), so it travels as one buffer.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Vec<u8>>;
