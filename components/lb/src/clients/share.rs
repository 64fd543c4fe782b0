//! The VIP holder's push of its client table to every peer
//! (`bulwark.raft.v1.Raft/ShareClients`, mTLS, peers only).
//!
//! Whole tables, not deltas: every [`INTERVAL`] the holder looks at its
//! table and, when it changed (or [`REFRESH`] passed, so a restarted peer
//! catches up), publishes a new snapshot; one task per peer sends the
//! latest one, skipping any it had no time for. A snapshot is idempotent,
//! so a lost or late push is repaired by the next, and nothing needs
//! ordering beyond the term check on the receiver ([`super::Received`]).
//! 5,000 IPv4 clients are 30 kB per push; idle watch streams change the
//! table rarely, a churning front at most four times a second. The price
//! is staleness: a connection opened in the last [`INTERVAL`] before a
//! failover may not be in the new holder's table, and its client waits for
//! its own timeout, as every client did before. A peer behind a cut link
//! delays only its own task ([`CALL_TIMEOUT`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bulwark_api::raft::v1 as pb;
use bulwark_common::tls::TlsMaterial;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ClientTable, MAX_SHARED, encode};
use crate::raft::network::{ClusterId, raft_client, with_cluster};
use crate::raft::{NodeId, Raft};
use crate::vip::VipHandle;

/// How often the holder looks for changes.
pub const INTERVAL: Duration = Duration::from_millis(250);
/// An unchanged table is pushed again this often.
pub const REFRESH: Duration = Duration::from_secs(2);
/// One push's bound.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything the push loop needs.
pub struct Sharer {
    /// This node.
    pub node_id: NodeId,
    /// For the term, the leader state and the members.
    pub raft: Raft,
    /// Whether this node holds the VIP.
    pub vip: VipHandle,
    /// This node's front's connections.
    pub table: ClientTable,
    /// Our identity towards the peers.
    pub tls: Arc<TlsMaterial>,
    /// Sent with every call.
    pub cluster: ClusterId,
}

type Latest = watch::Receiver<Option<Arc<pb::ShareClientsRequest>>>;

impl Sharer {
    /// Pushes while this node holds the VIP, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (tx, rx) = watch::channel(None);
        let mut peers: HashMap<NodeId, (String, JoinHandle<()>)> = HashMap::new();
        let mut last: Option<(u64, u64, Instant)> = None;
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let Some(term) = self.holding_term() else {
                last = None;
                continue;
            };
            self.follow_members(&mut peers, &rx);
            let version = self.table.version();
            let fresh =
                last.is_some_and(|(t, v, at)| t == term && v == version && at.elapsed() < REFRESH);
            if fresh {
                continue;
            }
            let (flows, omitted) = self.table.snapshot(MAX_SHARED);
            metrics::gauge!("bulwark_lb_vip_clients_shared").set(flows.len() as f64);
            metrics::gauge!("bulwark_lb_vip_clients_omitted").set(omitted as f64);
            if omitted > 0 && last.is_none_or(|(t, _, _)| t != term) {
                tracing::warn!(
                    omitted,
                    bound = MAX_SHARED,
                    "more client connections than the shared table holds; those left out get no tickle after a failover"
                );
            }
            tx.send_replace(Some(Arc::new(pb::ShareClientsRequest {
                holder_node_id: self.node_id,
                term,
                fronts: encode(&flows),
                omitted: omitted as u64,
            })));
            last = Some((term, version, Instant::now()));
        }
        for (_, (_, task)) in peers {
            task.abort();
        }
        Ok(())
    }

    /// The term this node holds the VIP in, if it does.
    fn holding_term(&self) -> Option<u64> {
        if !self.vip.state().holding {
            return None;
        }
        let m = self.raft.metrics().borrow_watched().clone();
        (m.state == ServerState::Leader).then_some(m.current_term)
    }

    /// One push task per member other than this node; a member that left
    /// or moved loses its task.
    fn follow_members(&self, peers: &mut HashMap<NodeId, (String, JoinHandle<()>)>, rx: &Latest) {
        let m = self.raft.metrics().borrow_watched().clone();
        let members: HashMap<NodeId, String> = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.node_id)
            .map(|(id, n)| (*id, n.raft_address.clone()))
            .collect();
        peers.retain(|id, (address, task)| {
            let keep = members.get(id) == Some(address);
            if !keep {
                task.abort();
            }
            keep
        });
        for (id, address) in members {
            if peers.contains_key(&id) {
                continue;
            }
            let task = tokio::spawn(push_to(
                id,
                address.clone(),
                self.tls.clone(),
                self.cluster.clone(),
                rx.clone(),
            ));
            peers.insert(id, (address, task));
        }
    }
}

/// Sends each new snapshot to one peer.
async fn push_to(
    peer: NodeId,
    address: String,
    tls: Arc<TlsMaterial>,
    cluster: ClusterId,
    mut latest: Latest,
) {
    let mut client = match raft_client(&address, &tls) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer, address, error = %e, "cannot build a client to share the VIP's client table");
            return;
        }
    };
    let mut failing = false;
    // Ends when the sharer (the sender) is gone.
    while latest.changed().await.is_ok() {
        let Some(req) = latest.borrow_and_update().clone() else {
            continue;
        };
        let call =
            client.share_clients(with_cluster(pb::ShareClientsRequest::clone(&req), &cluster));
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(peer, "sharing the VIP's client table with the peer again");
            }
            Ok(()) => {}
            Err(e) => {
                metrics::counter!("bulwark_lb_vip_client_share_failures_total").increment(1);
                if !failing {
                    failing = true;
                    tracing::warn!(peer, error = %e, "could not share the VIP's client table with the peer; retrying with the next change");
                }
            }
        }
    }
}
