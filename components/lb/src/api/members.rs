//! Membership and leadership calls: list, add (join, learner, catch up,
//! promote), remove (with the quorum checks), transfer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bulwark_api::lb::v1 as lb;
use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, RaftMetrics, ServerState};
use tonic::Status;

use super::convert::{failover_to_api, node_info};
use super::{Api, fields, voters, wait_metrics};
use crate::raft::NodeId;
use crate::raft::membership::{JoinError, admit};
use crate::raft::timers::PeerTimers;
use crate::raft::types::{LbNode, TypeConfig};

type Metrics = RaftMetrics<TypeConfig>;

/// This node's role.
pub fn role(m: &Metrics, me: NodeId) -> lb::NodeRole {
    match m.state {
        ServerState::Leader => lb::NodeRole::Leader,
        ServerState::Candidate => lb::NodeRole::Candidate,
        ServerState::Learner => lb::NodeRole::Learner,
        ServerState::Shutdown => lb::NodeRole::Shutdown,
        ServerState::Follower
            if m.membership_config
                .membership()
                .voter_ids()
                .any(|v| v == me) =>
        {
            lb::NodeRole::Follower
        }
        ServerState::Follower => lb::NodeRole::Learner,
    }
}

/// Every member, voters first; replication details when we lead; each
/// one's fence timers where `timers` knows them.
pub fn list(m: &Metrics, me: NodeId, timers: &PeerTimers) -> Vec<lb::Member> {
    let timers = timers.known(tokio::time::Instant::now());
    let voters = voters(m);
    let last = m.last_log_index.unwrap_or(0);
    let leading = crate::raft::leads(m, me);
    let mut out: Vec<lb::Member> = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| {
            let replication = leading.then(|| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index);
                let matched = if *id == me { Some(last) } else { matched };
                let age = m
                    .heartbeat
                    .as_ref()
                    .and_then(|h| h.get(id).cloned().flatten())
                    .map(|t| openraft::Instant::elapsed(&t.into_inner()));
                lb::ReplicationStatus {
                    matched_index: matched,
                    lag_entries: last.saturating_sub(matched.unwrap_or(0)),
                    last_ack_age: if *id == me {
                        bulwark_api::time::duration_to_proto(Duration::ZERO).ok()
                    } else {
                        age.and_then(|a| bulwark_api::time::duration_to_proto(a).ok())
                    },
                }
            });
            lb::Member {
                node: Some(node_info(*id, n)),
                role: if voters.contains(id) {
                    lb::MemberRole::Voter
                } else {
                    lb::MemberRole::Learner
                } as i32,
                replication,
                fence_timers: timers.get(id).map(|t| lb::FenceTimers {
                    hold: bulwark_api::time::duration_to_proto(t.hold).ok(),
                    election_timeout_max: bulwark_api::time::duration_to_proto(t.lease).ok(),
                }),
            }
        })
        .collect();
    out.sort_by_key(|m| {
        (
            m.role != lb::MemberRole::Voter as i32,
            m.node.as_ref().map_or(0, |n| n.id),
        )
    });
    out
}

fn raft_err(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("membership change failed: {e}"))
}

/// AddMember.
pub async fn add(api: &Api, r: lb::AddMemberRequest) -> Result<lb::AddMemberResponse, Status> {
    let info = r
        .node
        .ok_or_else(|| Status::invalid_argument("field `node` is required"))?;
    fields::node_id(info.id).map_err(|why| fields::invalid("node.id", info.id, &why))?;
    let mut addresses = vec![
        ("node.raft_address", &info.raft_address),
        ("node.api_address", &info.api_address),
    ];
    if !info.proxy_address.is_empty() {
        addresses.push(("node.proxy_address", &info.proxy_address));
    }
    for (field, value) in addresses {
        fields::host_port(value).map_err(|why| fields::invalid(field, super::clip(value), &why))?;
    }
    let timeout = match r.catch_up_timeout {
        None => Duration::from_secs(60),
        Some(d) => bulwark_api::time::duration_from_proto(&d)
            .map_err(|e| e.into_status("catch_up_timeout"))?,
    };
    api.require_leader()?;
    let m = api.metrics();
    if m.membership_config
        .membership()
        .get_node(&info.id)
        .is_some()
    {
        return Err(Status::already_exists(format!(
            "node {} is already a member; if its data dir was wiped, remove it first (RemoveMember) and add it again",
            info.id
        )));
    }
    let cluster = api
        .cluster
        .get()
        .ok_or_else(|| Status::failed_precondition("this node has no cluster id"))?;
    admit(&api.tls, &cluster, api.node_id, info.id, &info.raft_address)
        .await
        .map_err(|e| match e {
            JoinError::Unreachable { .. } => Status::unavailable(e.to_string()),
            JoinError::Refused { .. } => Status::failed_precondition(e.to_string()),
        })?;
    let name = if info.name.is_empty() {
        format!("node-{}", info.id)
    } else {
        info.name.clone()
    };
    let node = LbNode {
        name,
        raft_address: info.raft_address.clone(),
        api_address: info.api_address.clone(),
        proxy_address: info.proxy_address.clone(),
        zone: info.zone.clone(),
    };
    let resp = api
        .raft
        .add_learner(info.id, node.clone(), false)
        .await
        .map_err(raft_err)?;
    tracing::info!(
        node = info.id,
        "added as learner; waiting for it to catch up"
    );
    let target = resp.log_id.index;
    let id = info.id;
    let caught_up = wait_metrics(&api.raft, timeout, |m| {
        m.replication
            .as_ref()
            .and_then(|r| r.get(&id).cloned().flatten())
            .is_some_and(|l| l.index >= target)
    })
    .await;
    if !caught_up {
        return Err(Status::deadline_exceeded(format!(
            "node {id} did not catch up within {timeout:?}; it stays a learner (call AddMember again or RemoveMember)"
        )));
    }
    let log_index = if r.stay_learner {
        target
    } else {
        let resp = api
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
            .await
            .map_err(raft_err)?;
        tracing::info!(node = id, "promoted to voter");
        resp.log_id.index
    };
    let m = api.metrics();
    let member = list(&m, api.node_id, &api.timers)
        .into_iter()
        .find(|x| x.node.as_ref().is_some_and(|n| n.id == id));
    Ok(lb::AddMemberResponse {
        member,
        membership_log_index: log_index,
    })
}

/// The voters the leader heard from within `window` (itself included).
fn reachable(m: &Metrics, me: NodeId, window: Duration) -> BTreeSet<NodeId> {
    let mut out = BTreeSet::from([me]);
    if let Some(h) = &m.heartbeat {
        for (id, t) in h.iter() {
            if t.as_ref()
                .is_some_and(|t| openraft::Instant::elapsed(&(*t).into_inner()) < window)
            {
                out.insert(*id);
            }
        }
    }
    out
}

/// RemoveMember.
pub async fn remove(
    api: &Api,
    r: lb::RemoveMemberRequest,
) -> Result<lb::RemoveMemberResponse, Status> {
    api.require_leader()?;
    let m = api.metrics();
    let id = r.node_id;
    if m.membership_config.membership().get_node(&id).is_none() {
        return Err(Status::not_found(format!("node {id} is not a member")));
    }
    let all_voters = voters(&m);
    let change = if all_voters.contains(&id) {
        let remaining: BTreeSet<NodeId> = all_voters.iter().copied().filter(|v| *v != id).collect();
        if remaining.is_empty() {
            return Err(Status::failed_precondition(format!(
                "node {id} is the last voter: removing it would leave the cluster without anyone to elect a leader; add another member first"
            )));
        }
        let up = reachable(&m, api.node_id, api.election_timeout_max * 2);
        let quorum = remaining.len() / 2 + 1;
        let up_remaining = remaining.intersection(&up).count();
        if up_remaining < quorum && !r.force {
            return Err(Status::failed_precondition(format!(
                "removing node {id} leaves {} voters, of which only {up_remaining} answer now; a quorum needs {quorum}. Bring members back or set force",
                remaining.len()
            )));
        }
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    let resp = api
        .raft
        .change_membership(change, false)
        .await
        .map_err(raft_err)?;
    // A removed voter is still a node (learner) until removed as a node.
    let resp = if api
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .get_node(&id)
        .is_some()
    {
        api.raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map_err(raft_err)?
    } else {
        resp
    };
    tracing::info!(node = id, "member removed");
    Ok(lb::RemoveMemberResponse {
        membership_log_index: resp.log_id.index,
    })
}

/// TransferLeadership.
pub async fn transfer(
    api: &Api,
    r: lb::TransferLeadershipRequest,
) -> Result<lb::TransferLeadershipResponse, Status> {
    api.require_leader()?;
    let m = api.metrics();
    let voters = voters(&m);
    let to = match r.to_node_id {
        Some(to) if to == api.node_id => {
            return Err(Status::invalid_argument(format!("node {to} already leads")));
        }
        Some(to) if !voters.contains(&to) => {
            return Err(Status::invalid_argument(format!(
                "field `to_node_id`: node {to} is not a voter"
            )));
        }
        Some(to) => to,
        None => most_up_to_date(&m, api.node_id).ok_or_else(|| {
            Status::failed_precondition("there is no other voter to hand leadership to")
        })?,
    };
    let term = m.current_term;
    // The network releases the VIP before it sends the request.
    api.raft
        .trigger()
        .transfer_leader(to)
        .await
        .map_err(raft_err)?;
    let deadline = Duration::from_secs(5);
    let moved = wait_metrics(&api.raft, deadline, |m| {
        m.current_leader == Some(to) && m.current_term > term
    })
    .await;
    if !moved {
        return Err(Status::deadline_exceeded(format!(
            "node {to} did not take over within {deadline:?}"
        )));
    }
    let new_term = api.raft.metrics().borrow_watched().current_term;
    // Wait for the new holder's failover record when a VIP is in play.
    let mut rx = api.sm.subscribe();
    let failover = if api.vip_config.mode != crate::config::VipMode::Disabled {
        let wait = async {
            loop {
                let found = rx
                    .borrow_and_update()
                    .failovers()
                    .iter()
                    .rev()
                    .find(|f| f.to_node_id == to && f.term >= new_term)
                    .cloned();
                if let Some(f) = found {
                    return Some(f);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        match tokio::time::timeout(deadline, wait).await {
            Ok(f) => f,
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "node {to} leads but did not take the VIP within {deadline:?}"
                )));
            }
        }
    } else {
        None
    };
    let m = api.metrics();
    Ok(lb::TransferLeadershipResponse {
        new_leader: m
            .membership_config
            .membership()
            .get_node(&to)
            .map(|n| node_info(to, n)),
        term: new_term,
        failover: failover.as_ref().map(failover_to_api),
    })
}

/// The other voter whose log matches ours furthest.
fn most_up_to_date(m: &Metrics, me: NodeId) -> Option<NodeId> {
    let matched: BTreeMap<NodeId, u64> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, l)| (*id, l.as_ref().map_or(0, |l| l.index)))
                .collect()
        })
        .unwrap_or_default();
    voters(m)
        .into_iter()
        .filter(|v| *v != me)
        .max_by_key(|v| (matched.get(v).copied().unwrap_or(0), std::cmp::Reverse(*v)))
}
