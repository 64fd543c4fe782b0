//! The Raft gRPC service (`bulwark.raft.v1.Raft`), with three guards in
//! front of openraft:
//!
//! - **Cluster id.** A node whose data dir is empty takes part in nothing
//!   until it is admitted (Join): a wiped node must not rejoin with an
//!   empty log, which would let the cluster lose entries it counted on.
//!   A request from another cluster is refused too.
//! - **Start-up vote hold.** For one follower lease after the process
//!   starts, the node grants no vote: it may have acknowledged the old
//!   leader's heartbeat just before it restarted, and the fencing argument
//!   (docs/FAILOVER.md) needs every voter to wait out the lease after its
//!   last acknowledgement. openraft's in-memory lease does not survive a
//!   restart; this does.
//! - **Signals for the VIP task.** The time of the last append from a
//!   leader (the failover's "last contact") and of an accepted leadership
//!   transfer (whose election skips the voters' lease wait).
//!
//! Each call's fence timers header ([`super::timers`]) is recorded, and
//! every answer to openraft's calls carries ours.
//!
//! Beside openraft's calls it takes the VIP holder's client table
//! (`ShareClients`, [`crate::clients`]), kept for a tickle after a
//! failover.
//!
//! Access (LB peers only) is enforced before any handler by the server's
//! access layer from the protos' `ACCESS_PEER`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_api::raft::v1 as pb;
use bulwark_api::raft::v1::raft_server::Raft as RaftRpc;
use futures::StreamExt;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{
    ConvertError, append_req_from_pb, append_resp_to_pb, opt_log_id_to_pb, snapshot_meta_from_pb,
    transfer_req_from_pb, transfer_resp_to_pb, vote_from_pb, vote_req_from_pb, vote_resp_to_pb,
    vote_to_pb,
};
use super::network::{CLUSTER_ID_HEADER, ClusterId};
use super::store::Store;
use super::timers::PeerTimers;
use super::types::{Ballot, NodeId, Raft, Snapshot};
use crate::clients::{self, Received};
use crate::config::LbConfig;

/// What the Raft server and client observed, for the VIP task and failover
/// records.
#[derive(Debug)]
pub struct Signals {
    started: Instant,
    last_append: Mutex<Option<Heard>>,
    last_granted: Mutex<Option<Heard>>,
    transfer_at: Mutex<Option<Instant>>,
    timers: Arc<PeerTimers>,
}

impl Signals {
    /// Signals of a node starting now, which learns its peers' fence
    /// timers into `timers`.
    pub fn new(timers: Arc<PeerTimers>) -> Self {
        Self {
            started: Instant::now(),
            last_append: Mutex::new(None),
            last_granted: Mutex::new(None),
            transfer_at: Mutex::new(None),
            timers,
        }
    }

    /// The fence timers of this node and its peers.
    pub fn timers(&self) -> &Arc<PeerTimers> {
        &self.timers
    }

    /// The last append accepted from a leader.
    pub fn last_append(&self) -> Option<Heard> {
        get(&self.last_append)
    }

    /// The last real vote this node granted.
    pub fn last_granted(&self) -> Option<Heard> {
        get(&self.last_granted)
    }

    /// When this node last accepted a leadership transfer.
    pub fn transfer_at(&self) -> Option<Instant> {
        get(&self.transfer_at)
    }

    fn appended(&self, leader: NodeId, term: u64) {
        set(&self.last_append, Some(Heard::now(leader, term)));
    }

    fn granted(&self, candidate: NodeId, term: u64) {
        set(&self.last_granted, Some(Heard::now(candidate, term)));
    }

    fn transfer(&self) {
        set(&self.transfer_at, Some(Instant::now()));
    }
}

/// A signal's value. A poisoned lock still holds the last value written
/// (each write is one store), so it is read as it is.
fn get<T: Copy>(signal: &Mutex<T>) -> T {
    *signal.lock().unwrap_or_else(|p| p.into_inner())
}

fn set<T>(signal: &Mutex<T>, value: T) {
    *signal.lock().unwrap_or_else(|p| p.into_inner()) = value;
}

/// An append from a leader or a vote request from a candidate that this
/// node accepted: when, from whom, in which term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heard {
    /// When the server had it accepted.
    pub at: Instant,
    /// The leader or candidate.
    pub from: NodeId,
    /// Its term.
    pub term: u64,
}

impl Heard {
    fn now(from: NodeId, term: u64) -> Self {
        Self {
            at: Instant::now(),
            from,
            term,
        }
    }
}

/// The service.
pub struct RaftService {
    node_id: NodeId,
    raft: Raft,
    store: Store,
    cluster: ClusterId,
    signals: Arc<Signals>,
    vote_hold: Duration,
    /// Serializes Join so two admissions cannot both see "no cluster".
    join_lock: tokio::sync::Mutex<()>,
    /// The latest client table a VIP holder shared with this node.
    received: Received,
}

impl RaftService {
    /// The service of node `config.nodeId`, whose follower lease is
    /// `raft.electionTimeoutMax`: peers' RPCs, the bootstrap protocol and
    /// the leadership-transfer signals (and the peers' fence timers).
    pub fn new(
        config: &LbConfig,
        raft: &Raft,
        store: &Store,
        cluster: &ClusterId,
        signals: &Arc<Signals>,
    ) -> Self {
        Self {
            node_id: config.node_id,
            raft: raft.clone(),
            store: store.clone(),
            cluster: cluster.clone(),
            signals: signals.clone(),
            vote_hold: config.raft.election_timeout_max,
            join_lock: tokio::sync::Mutex::new(()),
            received: Received::new(),
        }
    }

    /// Keeps shared client tables in `received` (the VIP task tickles
    /// from it after a claim).
    #[must_use]
    pub fn with_received_clients(mut self, received: Received) -> Self {
        self.received = received;
        self
    }

    /// Refuses the call unless this node belongs to the caller's cluster;
    /// records the caller's fence timers.
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.same_cluster(req)?;
        self.signals.timers.learn(req.metadata());
        Ok(())
    }

    fn same_cluster<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let ours = self.cluster.get().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {} has no Raft data (new or wiped data dir); it takes part only after an operator adds it (bulwarkctl lb add-member)",
                self.node_id
            ))
        })?;
        let theirs = req
            .metadata()
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok());
        match theirs {
            Some(t) if t == ours => Ok(()),
            Some(t) => Err(Status::failed_precondition(format!(
                "node {} belongs to cluster {ours}, not {t}",
                self.node_id
            ))),
            None => Err(Status::invalid_argument(format!(
                "missing the {CLUSTER_ID_HEADER} header"
            ))),
        }
    }

    /// Admits the call, then turns its message into openraft's request.
    fn decode<P, T>(
        &self,
        request: &Request<P>,
        from_pb: fn(&P) -> Result<T, ConvertError>,
    ) -> Result<T, Status> {
        self.admit(request)?;
        from_pb(request.get_ref()).map_err(bad)
    }

    /// Answers a Vote or a PreVote: the same checks, then the matching
    /// openraft call.
    async fn ballot(
        &self,
        request: Request<pb::VoteRequest>,
        ballot: Ballot,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let req = self.decode(&request, vote_req_from_pb)?;
        let (candidate, term) = (req.vote.leader_id.node_id, req.vote.leader_id.term);
        // Only a real vote can come from a leadership transfer; a pre-vote
        // is held back for the whole follower lease.
        let transfer = ballot == Ballot::Vote && req.leadership_transfer;
        self.hold_votes(transfer)?;
        let resp = match ballot {
            Ballot::Vote => self.raft.vote(req).await,
            Ballot::PreVote => self.raft.pre_vote(req).await,
        }
        .map_err(fatal)?;
        if ballot == Ballot::Vote && resp.vote_granted {
            // Like an append, a granted vote starts a new silence for the
            // elector: the candidate is about to lead.
            self.signals.granted(candidate, term);
        }
        Ok(self.answer(vote_resp_to_pb(&resp)))
    }

    /// An answer to a peer's Raft call, with the fence timers we know.
    fn answer<T>(&self, msg: T) -> Response<T> {
        let mut resp = Response::new(msg);
        self.signals.timers.tell(resp.metadata_mut());
        resp
    }

    fn hold_votes(&self, transfer: bool) -> Result<(), Status> {
        let up = self.signals.started.elapsed();
        if !transfer && up < self.vote_hold {
            return Err(Status::unavailable(format!(
                "node {} started {up:?} ago and grants no vote during its first {:?}",
                self.node_id, self.vote_hold
            )));
        }
        Ok(())
    }
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("Raft is not running: {e}"))
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let req = self.decode(&request, append_req_from_pb)?;
        let (leader, term) = (req.vote.leader_id.node_id, req.vote.leader_id.term);
        let committed = req.vote.committed;
        let resp = self.raft.append_entries(req).await.map_err(fatal)?;
        if committed && resp.is_success() {
            self.signals.appended(leader, term);
        }
        Ok(self.answer(append_resp_to_pb(&resp)))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.ballot(request, Ballot::Vote).await
    }

    async fn pre_vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.ballot(request, Ballot::PreVote).await
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::InstallSnapshotRequest>>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        self.admit(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::InstallSnapshotRequest {
                chunk: Some(pb::install_snapshot_request::Chunk::Header(h)),
            })) => h,
            Some(Err(e)) => return Err(e),
            _ => return Err(bad("the first InstallSnapshot message must be the header")),
        };
        let vote = vote_from_pb(header.vote.as_ref(), "InstallSnapshotHeader").map_err(bad)?;
        let meta = snapshot_meta_from_pb(
            header
                .meta
                .as_ref()
                .ok_or_else(|| bad("InstallSnapshotHeader.meta is missing"))?,
        )
        .map_err(bad)?;
        // The state is small; cap what a peer can make us buffer.
        const MAX: u64 = 256 * 1024 * 1024;
        let expected = header.size_bytes.unwrap_or(0);
        if expected > MAX {
            return Err(bad(format!("snapshot of {expected} bytes exceeds {MAX}")));
        }
        let mut data = Vec::with_capacity(expected as usize);
        while let Some(msg) = stream.next().await {
            match msg?.chunk {
                Some(pb::install_snapshot_request::Chunk::Data(d)) => {
                    if (data.len() + d.len()) as u64 > MAX {
                        return Err(bad(format!("snapshot exceeds {MAX} bytes")));
                    }
                    data.extend_from_slice(&d);
                }
                _ => return Err(bad("only data chunks may follow the header")),
            }
        }
        let resp = self
            .raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: data,
                },
            )
            .await
            .map_err(fatal)?;
        Ok(self.answer(pb::InstallSnapshotResponse {
            vote: Some(vote_to_pb(&resp.vote)),
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let req = self.decode(&request, transfer_req_from_pb)?;
        // Recorded before the election can start, so that a win is known
        // to come from a transfer.
        self.signals.transfer();
        let resp = self.raft.handle_transfer_leader(req).await.map_err(fatal)?;
        Ok(self.answer(transfer_resp_to_pb(&resp)))
    }

    async fn get_node_state(
        &self,
        _request: Request<pb::GetNodeStateRequest>,
    ) -> Result<Response<pb::GetNodeStateResponse>, Status> {
        let last = {
            let mut log = self.store.log_store();
            openraft::storage::RaftLogStorage::get_log_state(&mut log)
                .await
                .map_err(|e| Status::internal(format!("reading the log: {e}")))?
                .last_log_id
        };
        Ok(Response::new(pb::GetNodeStateResponse {
            node_id: self.node_id,
            cluster_id: self.cluster.get().unwrap_or_default(),
            last_log_id: opt_log_id_to_pb(last.as_ref()),
        }))
    }

    async fn share_clients(
        &self,
        request: Request<pb::ShareClientsRequest>,
    ) -> Result<Response<pb::ShareClientsResponse>, Status> {
        self.admit(&request)?;
        let req = request.into_inner();
        let flows = clients::decode(&req.fronts).map_err(bad)?;
        let len = flows.len();
        let kept = self.received.offer(clients::Shared {
            holder: req.holder_node_id,
            term: req.term,
            flows,
            at: Instant::now(),
        });
        if kept {
            metrics::gauge!("bulwark_lb_vip_clients_received").set(len as f64);
        }
        Ok(Response::new(pb::ShareClientsResponse {}))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = request.into_inner();
        if req.cluster_id.is_empty() || req.cluster_id.len() > 64 {
            return Err(bad("cluster_id must be 1-64 characters"));
        }
        if req.node_id != self.node_id {
            return Err(Status::invalid_argument(format!(
                "this node is configured as node {}, not {}",
                self.node_id, req.node_id
            )));
        }
        let _guard = self.join_lock.lock().await;
        match self.cluster.get() {
            Some(ours) if ours == req.cluster_id => {}
            Some(ours) => {
                return Err(Status::failed_precondition(format!(
                    "node {} already belongs to cluster {ours}; wipe its data dir to move it",
                    self.node_id
                )));
            }
            None => {
                self.store
                    .set_cluster_id(&req.cluster_id)
                    .await
                    .map_err(|e| Status::internal(format!("storing the cluster id: {e}")))?;
                self.cluster.set(req.cluster_id.clone());
                tracing::info!(cluster = %req.cluster_id, by = req.from_node_id, "joined the cluster");
            }
        }
        Ok(Response::new(pb::JoinResponse {}))
    }
}
