//! The Raft client: openraft's `RaftNetworkV2` over mTLS gRPC
//! (`bulwark.raft.v1.Raft`).
//!
//! One lazily connecting channel per peer, replaced by a fresh one when the
//! peer has answered nothing on it for two seconds. Every call carries our
//! cluster id (a node of another cluster refuses it) and is bounded by
//! openraft's per-RPC deadline, so a peer behind a cut link costs a
//! timeout, not a stuck replication stream. Appends are split so that one request stays
//! far below gRPC's 4 MiB default limit (the follower then answers
//! PartialSuccess-style: we report the prefix that went through); snapshots
//! stream in 1 MiB chunks.
//!
//! Every request and answer carries the fence timers this node knows
//! ([`super::timers`]), and those the peer sends back are recorded.
//!
//! Before it asks a peer to take over leadership, this node releases the
//! VIP ([`Handover`]): a transfer election skips the voters' lease wait, so
//! the old holder must be gone first.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_api::raft::v1 as pb;
use bulwark_api::raft::v1::raft_client::RaftClient;
use bulwark_common::tls::TlsMaterial;
use futures::future::BoxFuture;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkFactory, RaftNetworkV2};
use prost::Message;
use tonic::transport::Channel;

use super::convert::{
    ConvertError, append_req_to_pb, append_resp_from_pb, entry_to_pb, snapshot_meta_to_pb,
    transfer_req_to_pb, transfer_resp_from_pb, vote_from_pb, vote_req_to_pb, vote_resp_from_pb,
    vote_to_pb,
};
use super::timers::PeerTimers;
use super::types::{Ballot, LbNode, NodeId, Snapshot, TypeConfig, Vote};

/// Request header carrying the sender's cluster id.
pub const CLUSTER_ID_HEADER: &str = "bulwark-cluster-id";
/// Largest encoded append we send in one request.
pub const MAX_APPEND_BYTES: usize = 2 * 1024 * 1024;
/// Snapshot chunk size.
pub const SNAPSHOT_CHUNK: usize = 1024 * 1024;

/// Releases the VIP before leadership is handed to another node.
pub trait Handover: Send + Sync + 'static {
    /// Returns once this node no longer holds the VIP and will not claim it
    /// again in `term`.
    fn hand_over(&self, term: u64) -> BoxFuture<'static, ()>;
}

/// The cluster id this node speaks for, shared with the server and the
/// bootstrap code (it is set once, when the node bootstraps or joins).
#[derive(Clone, Debug, Default)]
pub struct ClusterId(Arc<std::sync::RwLock<Option<String>>>);

impl ClusterId {
    /// A known id.
    pub fn new(id: Option<String>) -> Self {
        Self(Arc::new(std::sync::RwLock::new(id)))
    }

    /// The id, once known.
    pub fn get(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets it (after it was stored durably).
    pub fn set(&self, id: String) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }
}

/// Creates clients to peers. Channels are kept per address and shared by
/// every client openraft asks for: a candidate's vote requests warm the
/// connection its replication will use once it leads, so a new leader's
/// first heartbeat pays no TCP and TLS handshake.
#[derive(Clone)]
pub struct Network {
    cluster: ClusterId,
    handover: Arc<dyn Handover>,
    timers: Arc<PeerTimers>,
    channels: Channels,
}

impl Network {
    /// A factory using our TLS identity, telling and learning the fence
    /// timers in `timers`.
    pub fn new(
        tls: Arc<TlsMaterial>,
        cluster: ClusterId,
        handover: Arc<dyn Handover>,
        timers: Arc<PeerTimers>,
    ) -> Self {
        Self {
            cluster,
            handover,
            timers,
            channels: Channels::new(tls),
        }
    }
}

/// How long a peer's channel may go without any answer before it is
/// replaced by a fresh connection. Longer than any normal stall (a GC-free
/// process answers heartbeats in milliseconds; a loaded 2-core machine in
/// tens), short against the 60 s a wedged HTTP/2 connection was seen to
/// cost: once, after a partition healed, every call on one connection timed
/// out while the peer answered everyone else. A real partition costs one
/// idle reconnect per interval, which the lazy channel does not even dial
/// until the next call.
const REBUILD_AFTER: Duration = Duration::from_secs(2);

/// The per-address channels, each with the time its calls started to go
/// unanswered.
#[derive(Clone)]
struct Channels {
    tls: Arc<TlsMaterial>,
    slots: Arc<std::sync::Mutex<std::collections::HashMap<String, Slot>>>,
}

struct Slot {
    client: RaftClient<Channel>,
    silence: Silence,
}

/// When a channel's calls started to go unanswered.
#[derive(Debug, Default)]
struct Silence {
    since: Option<Instant>,
}

impl Silence {
    /// Records one call's outcome at `now`; returns how long the channel
    /// has been silent once that reaches [`REBUILD_AFTER`].
    fn record(&mut self, answered: bool, now: Instant) -> Option<Duration> {
        if answered {
            self.since = None;
            return None;
        }
        let silent = now.duration_since(*self.since.get_or_insert(now));
        (silent >= REBUILD_AFTER).then_some(silent)
    }
}

impl Channels {
    fn new(tls: Arc<TlsMaterial>) -> Self {
        Self {
            tls,
            slots: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared client for `address`, built on first use.
    fn client(&self, address: &str) -> Result<RaftClient<Channel>, tonic::transport::Error> {
        let mut slots = self.lock();
        if let Some(slot) = slots.get(address) {
            return Ok(slot.client.clone());
        }
        let client = raft_client(address, &self.tls)?;
        slots.insert(
            address.to_owned(),
            Slot {
                client: client.clone(),
                silence: Silence::default(),
            },
        );
        Ok(client)
    }

    /// Records whether the peer at `address` answered a call; drops its
    /// channel (the next call dials afresh) once it has answered nothing
    /// for [`REBUILD_AFTER`].
    fn record(&self, target: NodeId, address: &str, answered: bool) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(address) else {
            return;
        };
        if let Some(silent) = slot.silence.record(answered, Instant::now()) {
            tracing::info!(
                peer = target,
                address,
                silent_ms = silent.as_millis() as u64,
                "no answer from the peer on this connection; reconnecting"
            );
            slots.remove(address);
        }
    }
}

/// A client for `address` (used outside openraft too: bootstrap, join).
pub fn raft_client(
    address: &str,
    tls: &TlsMaterial,
) -> Result<RaftClient<Channel>, tonic::transport::Error> {
    Ok(
        RaftClient::new(bulwark_common::grpc::channel(address, tls, None)?)
            // Snapshots and split appends stay below this; the margin covers
            // one oversized entry we cannot split.
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024),
    )
}

/// Attaches the cluster id header.
pub fn with_cluster<T>(msg: T, cluster: &ClusterId) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(id) = cluster.get()
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(id.as_str())
    {
        req.metadata_mut().insert(CLUSTER_ID_HEADER, v);
    }
    req
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &LbNode) -> Self::Network {
        if let Err(e) = self.channels.client(&node.raft_address) {
            tracing::error!(peer = target, address = %node.raft_address, error = %e, "cannot build a Raft client");
        }
        Peer {
            target,
            address: node.raft_address.clone(),
            channels: self.channels.clone(),
            cluster: self.cluster.clone(),
            handover: self.handover.clone(),
            timers: self.timers.clone(),
        }
    }
}

/// The connection to one peer.
pub struct Peer {
    target: NodeId,
    address: String,
    channels: Channels,
    cluster: ClusterId,
    handover: Arc<dyn Handover>,
    timers: Arc<PeerTimers>,
}

fn unreachable(msg: impl ToString) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(msg))
}

fn network(msg: impl ToString) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(msg))
}

/// Maps a failed call: the peer not answering at all is Unreachable (back
/// off), anything else a network error (retry at once).
fn status_err(target: NodeId, s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::FailedPrecondition => {
            unreachable(format!("node {target}: {}", s.message()))
        }
        _ => network(format!("node {target}: {}: {}", s.code(), s.message())),
    }
}

fn decode_err(target: NodeId, e: ConvertError) -> RPCError<TypeConfig> {
    network(format!("node {target} sent a malformed answer: {e}"))
}

impl Peer {
    // openraft's error type is large; this is its own API's shape.
    #[allow(clippy::result_large_err)]
    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        self.channels
            .client(&self.address)
            .map_err(|e| unreachable(format!("node {}: {e}", self.target)))
    }

    /// `msg` with the cluster id and the fence timers we know.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = with_cluster(msg, &self.cluster);
        self.timers.tell(req.metadata_mut());
        req
    }

    /// Sends a Vote or a PreVote: the same message on the matching RPC.
    async fn ballot(
        &self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
        ballot: Ballot,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut client = self.client()?;
        let req = self.request(vote_req_to_pb(&rpc));
        let call = async move {
            match ballot {
                Ballot::Vote => client.vote(req).await,
                Ballot::PreVote => client.pre_vote(req).await,
            }
        };
        let resp = self.bounded(option.hard_ttl(), call).await?;
        vote_resp_from_pb(&resp).map_err(|e| decode_err(self.target, e))
    }

    async fn bounded<T, F>(&self, ttl: Duration, f: F) -> Result<T, RPCError<TypeConfig>>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let result = tokio::time::timeout(ttl, f).await;
        let answered = match &result {
            Ok(Ok(_)) => true,
            // Refusals and errors the peer's service sent are answers; a
            // transport failure (no connection, a reset or refused HTTP/2
            // stream, a GOAWAY) is not.
            Ok(Err(s)) => !matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::Unknown
            ),
            Err(_) => false,
        };
        self.channels.record(self.target, &self.address, answered);
        match result {
            Ok(Ok(r)) => {
                self.timers.learn(r.metadata());
                Ok(r.into_inner())
            }
            Ok(Err(s)) => Err(status_err(self.target, s)),
            Err(_) => Err(unreachable(format!(
                "node {}: no answer within {ttl:?}",
                self.target
            ))),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut req = append_req_to_pb(&AppendEntriesRequest {
            entries: Vec::new(),
            ..rpc.clone()
        });
        // Take entries while they fit; always at least one.
        let mut size = 0;
        let mut truncated = false;
        for e in &rpc.entries {
            let pb_entry = entry_to_pb(e);
            let len = pb_entry.encoded_len();
            if !req.entries.is_empty() && size + len > MAX_APPEND_BYTES {
                truncated = true;
                break;
            }
            size += len;
            req.entries.push(pb_entry);
        }
        let sent_last = req.entries.last().and_then(|e| e.log_id);
        let mut client = self.client()?;
        let resp = self
            .bounded(option.hard_ttl(), client.append_entries(self.request(req)))
            .await?;
        let resp = append_resp_from_pb(&resp).map_err(|e| decode_err(self.target, e))?;
        Ok(match (resp, truncated) {
            (AppendEntriesResponse::Success, true) => AppendEntriesResponse::PartialSuccess(
                sent_last.map(|l| super::convert::log_id_from_pb(&l)),
            ),
            (other, _) => other,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.ballot(rpc, option, Ballot::Vote).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.ballot(rpc, option, Ballot::PreVote).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = pb::InstallSnapshotRequest {
            chunk: Some(pb::install_snapshot_request::Chunk::Header(
                pb::InstallSnapshotHeader {
                    vote: Some(vote_to_pb(&vote)),
                    meta: Some(snapshot_meta_to_pb(&snapshot.meta)),
                    size_bytes: Some(snapshot.snapshot.len() as u64),
                },
            )),
        };
        let chunks: Vec<pb::InstallSnapshotRequest> =
            std::iter::once(header)
                .chain(snapshot.snapshot.chunks(SNAPSHOT_CHUNK).map(|c| {
                    pb::InstallSnapshotRequest {
                        chunk: Some(pb::install_snapshot_request::Chunk::Data(c.to_vec())),
                    }
                }))
                .collect();
        let mut client = self.client().map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Network(NetworkError::from_string(other)),
        })?;
        let call = client.install_snapshot(self.request(futures::stream::iter(chunks)));
        let result = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = tokio::time::timeout(option.hard_ttl().max(Duration::from_secs(10)), call) => r,
        };
        let resp = match result {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => {
                return Err(StreamingError::Network(NetworkError::from_string(format!(
                    "node {}: {}: {}",
                    self.target,
                    s.code(),
                    s.message()
                ))));
            }
            Err(_) => {
                return Err(StreamingError::Unreachable(Unreachable::from_string(
                    format!("node {}: snapshot not acknowledged in time", self.target),
                )));
            }
        };
        Ok(SnapshotResponse::new(
            vote_from_pb(resp.vote.as_ref(), "InstallSnapshotResponse")
                .map_err(|e| StreamingError::Network(NetworkError::from_string(e)))?,
        ))
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Release before the target can run a transfer election, which
        // voters grant without waiting out our lease.
        self.handover
            .hand_over(req.from_leader().leader_id.term)
            .await;
        let mut client = self.client()?;
        let resp = self
            .bounded(
                option.hard_ttl(),
                client.transfer_leader(self.request(transfer_req_to_pb(&req))),
            )
            .await?;
        transfer_resp_from_pb(&resp).map_err(|e| decode_err(self.target, e))
    }

    fn backoff(&self) -> Option<Backoff> {
        // Short and flat: a follower back from a blip must hear heartbeats
        // again well within its election timeout, and peers are few.
        Some(Backoff::new(std::iter::repeat(Duration::from_millis(50))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_is_replaced_only_after_a_long_silence() {
        let t0 = Instant::now();
        let mut s = Silence::default();
        assert_eq!(s.record(false, t0), None);
        assert_eq!(s.record(false, t0 + Duration::from_millis(1500)), None);
        // One answer forgives everything before it.
        assert_eq!(s.record(true, t0 + Duration::from_millis(1600)), None);
        assert_eq!(s.record(false, t0 + Duration::from_millis(1700)), None);
        assert_eq!(s.record(false, t0 + Duration::from_millis(3600)), None);
        assert_eq!(
            s.record(false, t0 + Duration::from_millis(3700)),
            Some(REBUILD_AFTER)
        );
    }
}
