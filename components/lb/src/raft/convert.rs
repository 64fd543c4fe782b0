//! openraft types <-> `bulwark.raft.v1` protobuf.
//!
//! The same messages travel between nodes and sit in the log on disk, so
//! decoding is strict: a missing required field is an error naming it
//! (a corrupt file or a peer speaking another version), never a default
//! that would silently change the log.

use std::collections::{BTreeMap, BTreeSet};

use bulwark_api::raft::v1 as pb;
use openraft::EntryPayload;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::vote::RaftLeaderId;

use super::types::{
    Cmd, Entry, LbNode, LeaderId, LogId, Membership, NodeId, SnapshotMeta, StoredMembership,
    TypeConfig, Vote,
};

/// A protobuf message that cannot become an openraft value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required field is absent.
    #[error("{message}.{field} is missing")]
    Missing {
        /// The message type.
        message: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A membership that openraft refuses (e.g. a voter without a node).
    #[error("invalid membership: {0}")]
    Membership(String),
}

fn missing(message: &'static str, field: &'static str) -> ConvertError {
    ConvertError::Missing { message, field }
}

/// Log id to protobuf.
pub fn log_id_to_pb(id: &LogId) -> pb::LogId {
    pb::LogId {
        term: id.leader_id.term,
        node_id: id.leader_id.node_id,
        index: id.index,
    }
}

/// Log id from protobuf.
pub fn log_id_from_pb(id: &pb::LogId) -> LogId {
    LogId::new(LeaderId::new(id.term, id.node_id), id.index)
}

/// Optional log id to protobuf.
pub fn opt_log_id_to_pb(id: Option<&LogId>) -> Option<pb::LogId> {
    id.map(log_id_to_pb)
}

/// Optional log id from protobuf.
pub fn opt_log_id_from_pb(id: Option<&pb::LogId>) -> Option<LogId> {
    id.map(log_id_from_pb)
}

/// Vote to protobuf.
pub fn vote_to_pb(v: &Vote) -> pb::Vote {
    pb::Vote {
        leader_id: Some(pb::LeaderId {
            term: v.leader_id.term,
            node_id: v.leader_id.node_id,
        }),
        committed: v.committed,
    }
}

/// Vote from protobuf.
pub fn vote_from_pb(v: Option<&pb::Vote>, message: &'static str) -> Result<Vote, ConvertError> {
    let v = v.ok_or_else(|| missing(message, "vote"))?;
    let l = v
        .leader_id
        .as_ref()
        .ok_or_else(|| missing("Vote", "leader_id"))?;
    Ok(Vote {
        leader_id: LeaderId::new(l.term, l.node_id),
        committed: v.committed,
    })
}

/// Node record to protobuf.
pub fn node_to_pb(n: &LbNode) -> pb::Node {
    pb::Node {
        name: n.name.clone(),
        raft_address: n.raft_address.clone(),
        api_address: n.api_address.clone(),
        proxy_address: n.proxy_address.clone(),
        zone: n.zone.clone(),
    }
}

/// Node record from protobuf.
pub fn node_from_pb(n: &pb::Node) -> LbNode {
    LbNode {
        name: n.name.clone(),
        raft_address: n.raft_address.clone(),
        api_address: n.api_address.clone(),
        proxy_address: n.proxy_address.clone(),
        zone: n.zone.clone(),
    }
}

/// Membership to protobuf.
pub fn membership_to_pb(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::NodeIdSet {
                node_ids: set.iter().copied().collect(),
            })
            .collect(),
        nodes: m.nodes().map(|(id, n)| (*id, node_to_pb(n))).collect(),
    }
}

/// Membership from protobuf.
pub fn membership_from_pb(m: &pb::Membership) -> Result<Membership, ConvertError> {
    let configs: Vec<BTreeSet<NodeId>> = m
        .configs
        .iter()
        .map(|c| c.node_ids.iter().copied().collect())
        .collect();
    let nodes: BTreeMap<NodeId, LbNode> = m
        .nodes
        .iter()
        .map(|(id, n)| (*id, node_from_pb(n)))
        .collect();
    Membership::new(configs, nodes).map_err(|e| ConvertError::Membership(e.to_string()))
}

/// Stored membership to protobuf.
pub fn stored_membership_to_pb(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: opt_log_id_to_pb(m.log_id().as_ref()),
        membership: Some(membership_to_pb(m.membership())),
    }
}

/// Stored membership from protobuf; absent means the initial empty one.
pub fn stored_membership_from_pb(
    m: Option<&pb::StoredMembership>,
) -> Result<StoredMembership, ConvertError> {
    match m {
        None => Ok(StoredMembership::default()),
        Some(m) => Ok(StoredMembership::new(
            opt_log_id_from_pb(m.log_id.as_ref()),
            match &m.membership {
                Some(mem) => membership_from_pb(mem)?,
                None => Membership::default(),
            },
        )),
    }
}

/// Log entry to protobuf.
pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(()),
        EntryPayload::Normal(cmd) => pb::entry::Payload::Normal(cmd.0.clone()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry {
        log_id: Some(log_id_to_pb(&e.log_id)),
        payload: Some(payload),
    }
}

/// Log entry from protobuf.
pub fn entry_from_pb(e: &pb::Entry) -> Result<Entry, ConvertError> {
    let log_id = log_id_from_pb(
        e.log_id
            .as_ref()
            .ok_or_else(|| missing("Entry", "log_id"))?,
    );
    let payload = match e
        .payload
        .as_ref()
        .ok_or_else(|| missing("Entry", "payload"))?
    {
        pb::entry::Payload::Blank(()) => EntryPayload::Blank,
        pb::entry::Payload::Normal(c) => EntryPayload::Normal(Cmd(c.clone())),
        pb::entry::Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(m)?),
    };
    Ok(Entry { log_id, payload })
}

/// Vote request to protobuf.
pub fn vote_req_to_pb(r: &VoteRequest<TypeConfig>) -> pb::VoteRequest {
    pb::VoteRequest {
        vote: Some(vote_to_pb(&r.vote)),
        last_log_id: opt_log_id_to_pb(r.last_log_id.as_ref()),
        leadership_transfer: r.leadership_transfer,
    }
}

/// Vote request from protobuf.
pub fn vote_req_from_pb(r: &pb::VoteRequest) -> Result<VoteRequest<TypeConfig>, ConvertError> {
    let mut req = VoteRequest::new(
        vote_from_pb(r.vote.as_ref(), "VoteRequest")?,
        opt_log_id_from_pb(r.last_log_id.as_ref()),
    );
    req.leadership_transfer = r.leadership_transfer;
    Ok(req)
}

/// Vote response to protobuf.
pub fn vote_resp_to_pb(r: &VoteResponse<TypeConfig>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to_pb(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_to_pb(r.last_log_id.as_ref()),
    }
}

/// Vote response from protobuf.
pub fn vote_resp_from_pb(r: &pb::VoteResponse) -> Result<VoteResponse<TypeConfig>, ConvertError> {
    Ok(VoteResponse::new(
        vote_from_pb(r.vote.as_ref(), "VoteResponse")?,
        opt_log_id_from_pb(r.last_log_id.as_ref()),
        r.vote_granted,
    ))
}

/// Append request to protobuf.
pub fn append_req_to_pb(r: &AppendEntriesRequest<TypeConfig>) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        vote: Some(vote_to_pb(&r.vote)),
        prev_log_id: opt_log_id_to_pb(r.prev_log_id.as_ref()),
        entries: r.entries.iter().map(entry_to_pb).collect(),
        leader_commit: opt_log_id_to_pb(r.leader_commit.as_ref()),
    }
}

/// Append request from protobuf.
pub fn append_req_from_pb(
    r: &pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest<TypeConfig>, ConvertError> {
    Ok(AppendEntriesRequest {
        vote: vote_from_pb(r.vote.as_ref(), "AppendEntriesRequest")?,
        prev_log_id: opt_log_id_from_pb(r.prev_log_id.as_ref()),
        entries: r
            .entries
            .iter()
            .map(entry_from_pb)
            .collect::<Result<_, _>>()?,
        leader_commit: opt_log_id_from_pb(r.leader_commit.as_ref()),
    })
}

/// Append response to protobuf.
pub fn append_resp_to_pb(r: &AppendEntriesResponse<TypeConfig>) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    let result = match r {
        AppendEntriesResponse::Success => R::Success(pb::AppendSuccess {}),
        AppendEntriesResponse::PartialSuccess(l) => R::PartialSuccess(pb::AppendPartialSuccess {
            last_log_id: opt_log_id_to_pb(l.as_ref()),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(pb::AppendConflict {}),
        AppendEntriesResponse::HigherVote(v) => R::HigherVote(vote_to_pb(v)),
    };
    pb::AppendEntriesResponse {
        result: Some(result),
    }
}

/// Append response from protobuf.
pub fn append_resp_from_pb(
    r: &pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<TypeConfig>, ConvertError> {
    use pb::append_entries_response::Result as R;
    Ok(
        match r
            .result
            .as_ref()
            .ok_or_else(|| missing("AppendEntriesResponse", "result"))?
        {
            R::Success(_) => AppendEntriesResponse::Success,
            R::PartialSuccess(p) => {
                AppendEntriesResponse::PartialSuccess(opt_log_id_from_pb(p.last_log_id.as_ref()))
            }
            R::Conflict(_) => AppendEntriesResponse::Conflict,
            R::HigherVote(v) => {
                AppendEntriesResponse::HigherVote(vote_from_pb(Some(v), "AppendEntriesResponse")?)
            }
        },
    )
}

/// Snapshot meta to protobuf.
pub fn snapshot_meta_to_pb(m: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to_pb(m.last_log_id.as_ref()),
        last_membership: Some(stored_membership_to_pb(&m.last_membership)),
    }
}

/// Snapshot meta from protobuf.
pub fn snapshot_meta_from_pb(m: &pb::SnapshotMeta) -> Result<SnapshotMeta, ConvertError> {
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_pb(m.last_log_id.as_ref()),
        last_membership: stored_membership_from_pb(m.last_membership.as_ref())?,
    })
}

/// Transfer request to protobuf.
pub fn transfer_req_to_pb(r: &TransferLeaderRequest<TypeConfig>) -> pb::TransferLeaderRequest {
    pb::TransferLeaderRequest {
        from_leader: Some(vote_to_pb(r.from_leader())),
        to_node_id: *r.to_node_id(),
        last_log_id: opt_log_id_to_pb(r.last_log_id()),
    }
}

/// Transfer request from protobuf.
pub fn transfer_req_from_pb(
    r: &pb::TransferLeaderRequest,
) -> Result<TransferLeaderRequest<TypeConfig>, ConvertError> {
    Ok(TransferLeaderRequest::new(
        vote_from_pb(r.from_leader.as_ref(), "TransferLeaderRequest")?,
        r.to_node_id,
        opt_log_id_from_pb(r.last_log_id.as_ref()),
    ))
}

/// Transfer response to protobuf.
pub fn transfer_resp_to_pb(r: &TransferLeaderResponse<TypeConfig>) -> pb::TransferLeaderResponse {
    use openraft::raft::TransferLeaderError as E;
    use pb::transfer_leader_response::Result as R;
    let result = match r {
        Ok(()) => R::Ok(()),
        Err(E::VoteChanged { expected, actual }) => R::VoteChanged(pb::TransferVoteChanged {
            expected: Some(vote_to_pb(expected)),
            actual: Some(vote_to_pb(actual)),
        }),
        Err(E::LogNotFlushed { expected, actual }) => R::LogNotFlushed(pb::TransferLogNotFlushed {
            expected: opt_log_id_to_pb(expected.as_ref()),
            actual: opt_log_id_to_pb(actual.as_ref()),
        }),
    };
    pb::TransferLeaderResponse {
        result: Some(result),
    }
}

/// Transfer response from protobuf.
pub fn transfer_resp_from_pb(
    r: &pb::TransferLeaderResponse,
) -> Result<TransferLeaderResponse<TypeConfig>, ConvertError> {
    use openraft::raft::TransferLeaderError as E;
    use pb::transfer_leader_response::Result as R;
    Ok(
        match r
            .result
            .as_ref()
            .ok_or_else(|| missing("TransferLeaderResponse", "result"))?
        {
            R::Ok(()) => Ok(()),
            R::VoteChanged(v) => Err(E::VoteChanged {
                expected: vote_from_pb(v.expected.as_ref(), "TransferVoteChanged")?,
                actual: vote_from_pb(v.actual.as_ref(), "TransferVoteChanged")?,
            }),
            R::LogNotFlushed(l) => Err(E::LogNotFlushed {
                expected: opt_log_id_from_pb(l.expected.as_ref()),
                actual: opt_log_id_from_pb(l.actual.as_ref()),
            }),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> LbNode {
        LbNode {
            name: name.into(),
            raft_address: format!("{name}:9441"),
            api_address: format!("{name}:9442"),
            proxy_address: String::new(),
            zone: "z".into(),
        }
    }

    #[test]
    fn entries_round_trip() {
        let mem = Membership::new(
            vec![BTreeSet::from([1, 2]), BTreeSet::from([2, 3])],
            BTreeMap::from([
                (1, node("a")),
                (2, node("b")),
                (3, node("c")),
                (4, node("d")),
            ]),
        )
        .unwrap();
        let cmd = Cmd(pb::Command {
            proposed_at: None,
            command: Some(pb::command::Command::Noop(pb::Noop {})),
        });
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Normal(cmd),
            EntryPayload::Membership(mem),
        ] {
            let e = Entry {
                log_id: LogId::new(LeaderId::new(3, 2), 17),
                payload,
            };
            assert_eq!(entry_from_pb(&entry_to_pb(&e)).unwrap(), e);
        }
    }

    #[test]
    fn messages_round_trip_and_missing_fields_are_named() {
        let vote = Vote {
            leader_id: LeaderId::new(5, 1),
            committed: true,
        };
        let req = AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(LogId::new(LeaderId::new(4, 2), 9)),
            entries: vec![],
            leader_commit: None,
        };
        let back = append_req_from_pb(&append_req_to_pb(&req)).unwrap();
        assert_eq!(back.vote, vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);

        for r in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::HigherVote(vote),
        ] {
            assert_eq!(append_resp_from_pb(&append_resp_to_pb(&r)).unwrap(), r);
        }

        let err = append_req_from_pb(&pb::AppendEntriesRequest::default()).unwrap_err();
        assert_eq!(err.to_string(), "AppendEntriesRequest.vote is missing");
        let err = entry_from_pb(&pb::Entry {
            log_id: Some(pb::LogId::default()),
            payload: None,
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "Entry.payload is missing");
    }

    #[test]
    fn a_voter_without_a_node_is_refused() {
        let m = pb::Membership {
            configs: vec![pb::NodeIdSet { node_ids: vec![1] }],
            nodes: Default::default(),
        };
        assert!(matches!(
            membership_from_pb(&m),
            Err(ConvertError::Membership(_))
        ));
    }
}
