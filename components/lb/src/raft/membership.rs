//! Forming the cluster and admitting nodes.
//!
//! **Bootstrap.** Exactly one node creates the cluster: the initial member
//! with the lowest id (every node computes the same one), and only while it
//! has no cluster id. Before creating anything it asks every other initial
//! member for its state; if any already belongs to a cluster, this node's
//! data dir was wiped and it must not found a second cluster: it waits for
//! an operator to add it. Otherwise it picks a cluster id, records it, has
//! every initial member record it (Join), and initializes Raft with the
//! initial membership. All initial members must be up for the first start.
//! Each step is idempotent, so a crash half-way resumes where it stopped.
//!
//! **Admission.** A node with no cluster id refuses all Raft traffic (see
//! [`super::server`]). A leader adding a member first asks the node to
//! Join; only then is it added as a learner.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bulwark_api::raft::v1 as pb;
use bulwark_common::tls::TlsMaterial;
use rand::RngExt;
use tokio_util::sync::CancellationToken;

use super::network::{ClusterId, raft_client};
use super::store::Store;
use super::types::{LbNode, NodeId, Raft};
use crate::config::{LbConfig, MemberConfig};

/// Why a node could not be admitted or a cluster formed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The node could not be reached.
    #[error("node {node} at {address} is unreachable: {detail}")]
    Unreachable {
        /// Its id.
        node: NodeId,
        /// Its Raft address.
        address: String,
        /// What failed.
        detail: String,
    },
    /// The node belongs to another cluster (or has a different id).
    #[error("node {node} at {address} refused: {detail}")]
    Refused {
        /// Its id.
        node: NodeId,
        /// Its Raft address.
        address: String,
        /// Its answer.
        detail: String,
    },
}

/// The LB node record of an initial member.
pub fn member_node(m: &MemberConfig) -> LbNode {
    LbNode {
        name: m.name.clone().unwrap_or_else(|| format!("node-{}", m.id)),
        raft_address: m.raft_address.clone(),
        api_address: m.api_address.clone(),
        proxy_address: m.proxy_address.clone(),
        zone: m.zone.clone(),
    }
}

/// Asks the node at `address` to join `cluster` as `node`.
pub async fn admit(
    tls: &TlsMaterial,
    cluster: &str,
    from: NodeId,
    node: NodeId,
    address: &str,
) -> Result<(), JoinError> {
    let unreachable = |detail: String| JoinError::Unreachable {
        node,
        address: address.to_owned(),
        detail,
    };
    let mut client = raft_client(address, tls).map_err(|e| unreachable(e.to_string()))?;
    let req = pb::JoinRequest {
        cluster_id: cluster.to_owned(),
        node_id: node,
        from_node_id: from,
    };
    match tokio::time::timeout(Duration::from_secs(5), client.join(req)).await {
        Err(_) => Err(unreachable("no answer within 5s".into())),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s))
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) =>
        {
            Err(unreachable(s.message().to_owned()))
        }
        Ok(Err(s)) => Err(JoinError::Refused {
            node,
            address: address.to_owned(),
            detail: s.message().to_owned(),
        }),
    }
}

/// Asks the node at `address` which cluster it belongs to ("" = none).
pub async fn node_state(
    tls: &TlsMaterial,
    node: NodeId,
    address: &str,
) -> Result<pb::GetNodeStateResponse, JoinError> {
    let unreachable = |detail: String| JoinError::Unreachable {
        node,
        address: address.to_owned(),
        detail,
    };
    let mut client = raft_client(address, tls).map_err(|e| unreachable(e.to_string()))?;
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.get_node_state(pb::GetNodeStateRequest {}),
    )
    .await
    {
        Err(_) => Err(unreachable("no answer within 5s".into())),
        Ok(Err(s)) => Err(unreachable(s.message().to_owned())),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// How bootstrap ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// This node created the cluster (or finished creating it).
    Created,
    /// Not this node's job, or the cluster already exists.
    NotNeeded,
    /// Another initial member already belongs to a cluster: this node's
    /// data dir was wiped, and it waits for an operator to add it.
    Refused,
    /// Shutdown came first.
    Cancelled,
}

/// Runs the bootstrap protocol if this node is the bootstrapper. Retries
/// unreachable members every second until `shutdown`.
pub async fn bootstrap(
    config: &LbConfig,
    raft: &Raft,
    store: &Store,
    cluster: &ClusterId,
    tls: &Arc<TlsMaterial>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Bootstrap> {
    if config.bootstrapper() != Some(config.node_id) {
        return Ok(Bootstrap::NotNeeded);
    }
    if raft.is_initialized().await? {
        return Ok(Bootstrap::NotNeeded);
    }
    let others: Vec<&MemberConfig> = config
        .initial_members
        .iter()
        .filter(|m| m.id != config.node_id)
        .collect();

    let id = match cluster.get() {
        // A previous attempt stored the id: finish with the same one.
        Some(id) => id,
        None => {
            if !probe_until_all_fresh(&others, tls, shutdown).await? {
                return Ok(if shutdown.is_cancelled() {
                    Bootstrap::Cancelled
                } else {
                    Bootstrap::Refused
                });
            }
            let id = new_cluster_id();
            store.set_cluster_id(&id).await?;
            cluster.set(id.clone());
            id
        }
    };

    let mut pending: Vec<&MemberConfig> = others;
    let mut warned = false;
    while !pending.is_empty() {
        let mut still = Vec::new();
        for m in pending {
            match admit(tls, &id, config.node_id, m.id, &m.raft_address).await {
                Ok(()) => {}
                Err(e @ JoinError::Refused { .. }) => {
                    anyhow::bail!("bootstrap of cluster {id} stopped: {e}");
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "waiting for every initial member to form the cluster");
                        warned = true;
                    }
                    still.push(m);
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(Bootstrap::Cancelled),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    let members: BTreeMap<NodeId, LbNode> = config
        .initial_members
        .iter()
        .map(|m| (m.id, member_node(m)))
        .collect();
    match raft.initialize(members).await {
        Ok(()) => {
            tracing::info!(cluster = %id, "cluster created from the initial members");
            Ok(Bootstrap::Created)
        }
        Err(openraft::errors::RaftError::APIError(
            openraft::errors::InitializeError::NotAllowed(_),
        )) => Ok(Bootstrap::NotNeeded),
        Err(e) => Err(e.into()),
    }
}

/// Waits until every other initial member answers; true when none belongs
/// to a cluster, false when one does (or on shutdown).
async fn probe_until_all_fresh(
    others: &[&MemberConfig],
    tls: &TlsMaterial,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut warned = false;
    loop {
        let mut unreachable = None;
        for m in others {
            match node_state(tls, m.id, &m.raft_address).await {
                Ok(s) if !s.cluster_id.is_empty() => {
                    tracing::error!(
                        member = m.id,
                        cluster = %s.cluster_id,
                        "this node's data dir is empty but initial member {} already belongs to cluster {}: not creating a second cluster; an operator must add this node (bulwarkctl lb remove-member, then add-member)",
                        m.id,
                        s.cluster_id
                    );
                    return Ok(false);
                }
                Ok(s) if s.node_id != m.id => {
                    anyhow::bail!(
                        "initial member at {} says it is node {}, but the configuration says {}",
                        m.raft_address,
                        s.node_id,
                        m.id
                    );
                }
                Ok(_) => {}
                Err(e) => unreachable = Some(e),
            }
        }
        match unreachable {
            None => return Ok(true),
            Some(e) if !warned => {
                tracing::warn!(error = %e, "waiting for every initial member before creating the cluster");
                warned = true;
            }
            Some(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn new_cluster_id() -> String {
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}
