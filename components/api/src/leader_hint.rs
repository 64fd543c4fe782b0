//! "Ask the leader instead": a leader hint carried on a `tonic::Status`.
//!
//! Writes and health aggregation happen on the Raft leader. A follower that
//! gets such a call answers with an error whose metadata names the leader,
//! so a client (bulwarkctl, a prober) reconnects there without a discovery
//! round. Metadata rather than status details because any gRPC client, and
//! grpcurl's `-v`, shows metadata as plain text.
//!
//! The codes follow etcd: a known leader elsewhere is FAILED_PRECONDITION (do
//! not blindly retry here; go there), no leader at all is UNAVAILABLE (retry
//! with backoff). See [`not_leader`].

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::lb::v1::LeaderHint;

/// Metadata key of the leader's Raft node id, in decimal.
pub const LEADER_ID_KEY: &str = "bulwark-leader-id";
/// Metadata key of the leader's API address, host:port.
pub const LEADER_ADDR_KEY: &str = "bulwark-leader-addr";

/// Adds the leader hint to an existing status's metadata, replacing any
/// earlier hint. An address that is not printable ASCII is left out rather than failing the error path; the id alone still lets the
/// client find the leader in its member list.
pub fn attach(status: &mut Status, hint: &LeaderHint) {
    let metadata = status.metadata_mut();
    metadata.insert(LEADER_ID_KEY, MetadataValue::from(hint.node_id));
    metadata.remove(LEADER_ADDR_KEY);
    // HTTP allows some non-ASCII header bytes, but readers (`to_str`, other
    // languages' gRPC) reject them, so only plain printable ASCII goes out.
    if !hint.address.is_empty()
        && hint.address.bytes().all(|b| b.is_ascii_graphic())
        && let Ok(addr) = MetadataValue::try_from(hint.address.as_str())
    {
        metadata.insert(LEADER_ADDR_KEY, addr);
    }
}

/// Reads the leader hint from a status, if it carries one. `None` when the
/// id is missing or not a nonzero number (node ids are never 0). The address
/// is empty when the server left it out.
pub fn from_status(status: &Status) -> Option<LeaderHint> {
    let metadata = status.metadata();
    let node_id = metadata
        .get(LEADER_ID_KEY)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|id| *id != 0)?;
    let address = metadata
        .get(LEADER_ADDR_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some(LeaderHint { node_id, address })
}

/// The error a follower returns for a leader-only call: FAILED_PRECONDITION
/// with the hint attached when the leader is known, UNAVAILABLE ("no leader
/// elected") when it is not.
pub fn not_leader(hint: Option<&LeaderHint>) -> Status {
    match hint {
        Some(hint) => {
            let mut status = Status::new(
                Code::FailedPrecondition,
                format!(
                    "not the leader; the leader is node {} at {}",
                    hint.node_id, hint.address
                ),
            );
            attach(&mut status, hint);
            status
        }
        None => Status::unavailable("no leader elected; retry shortly"),
    }
}
