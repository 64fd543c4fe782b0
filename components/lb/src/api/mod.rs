//! The operator API (`bulwark.lb.v1.LoadBalancer`) and the backend set
//! watch (`bulwark.lb.v1.BackendWatch`).
//!
//! Reads are answered by any node from its applied state. Writes go
//! through Raft on the leader; a follower answers FAILED_PRECONDITION with
//! the leader's id and API address in the metadata
//! (`bulwark_api::leader_hint`), and bulwarkctl follows it, so there is no
//! second forwarding path to secure. Input is checked before anything is
//! proposed, and each error names the field or the backend.
//! Who may call what is enforced by the server's access layer from the
//! protos (destructive calls: operators only).
//!
//! `ProbeReports` (reports.rs) feeds the leader's health aggregation;
//! GetHealth shows it (leader only, where aggregation runs).

mod convert;
pub mod fields;
mod members;
mod reports;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::backend_watch_server::BackendWatch;
use bulwark_api::lb::v1::load_balancer_server::LoadBalancer;
use bulwark_api::raft::v1 as pb;
use bulwark_common::tls::TlsMaterial;
use futures::Stream;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use self::convert::{backend_entry, backend_to_api, node_info};
use crate::backends::{Backends, RoutingMode};
use crate::config::{LbConfig, VipConfig, VipMode};
use crate::health::HealthService;
use crate::raft::network::ClusterId;
use crate::raft::state::{ApplyError, LbState, command};
use crate::raft::store::StateMachineStore;
use crate::raft::timers::PeerTimers;
use crate::raft::types::LbNode;
use crate::raft::{NodeId, Raft};
use crate::vip::VipHandle;

/// Everything the handlers read.
#[derive(Clone)]
pub struct Api {
    node_id: NodeId,
    node: LbNode,
    raft: Raft,
    sm: StateMachineStore,
    backends: Backends,
    vip: VipHandle,
    vip_config: VipConfig,
    tls: Arc<TlsMaterial>,
    cluster: ClusterId,
    /// The fence timers of this node and its peers (ListMembers).
    timers: Arc<PeerTimers>,
    election_timeout_max: Duration,
    health: HealthService,
    listeners: Arc<[ListenerInfo]>,
}

/// The proxy listeners the node runs, with their routing modes, for
/// GetStatus.
fn listener_infos(config: &LbConfig) -> Vec<ListenerInfo> {
    let vip = config.vip.socket_addr().map(|a| ListenerInfo {
        name: "vip",
        address: a.to_string(),
        mode: config.routing.vip,
    });
    let local = config.local_listener.map(|a| ListenerInfo {
        name: "local",
        address: a.to_string(),
        mode: config.routing.local,
    });
    vip.into_iter().chain(local).collect()
}

/// One proxy listener of this node, as GetStatus reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerInfo {
    /// `vip` or `local`.
    pub name: &'static str,
    /// host:port it listens on.
    pub address: String,
    /// How it chooses backends.
    pub mode: RoutingMode,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl Api {
    /// The API of the node `config` describes (`node` as its peers see
    /// it), over that node's Raft, state, backends, VIP and health.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &LbConfig,
        node: LbNode,
        raft: &Raft,
        sm: &StateMachineStore,
        backends: &Backends,
        vip: &VipHandle,
        tls: &Arc<TlsMaterial>,
        (cluster, timers): (&ClusterId, &Arc<PeerTimers>),
        health: HealthService,
    ) -> Self {
        Self {
            node_id: config.node_id,
            node,
            raft: raft.clone(),
            sm: sm.clone(),
            backends: backends.clone(),
            vip: vip.clone(),
            vip_config: config.vip.clone(),
            tls: tls.clone(),
            cluster: cluster.clone(),
            timers: timers.clone(),
            election_timeout_max: config.raft.election_timeout_max,
            health,
            listeners: listener_infos(config).into(),
        }
    }

    /// Each listener's routing as the current snapshot applies it.
    fn listener_status(&self, set: &crate::backends::BackendSet) -> Vec<lb::ListenerStatus> {
        let zone = &self.node.zone;
        self.listeners
            .iter()
            .map(|l| {
                let preferring = l.mode == RoutingMode::ZonePreferred && !zone.is_empty();
                lb::ListenerStatus {
                    name: l.name.to_owned(),
                    address: l.address.clone(),
                    routing: match l.mode {
                        RoutingMode::Balanced => lb::RoutingMode::Balanced,
                        RoutingMode::ZonePreferred => lb::RoutingMode::ZonePreferred,
                    } as i32,
                    local_zone: zone.clone(),
                    spilled_over: preferring && set.spilled_over(),
                    local_share: set.local_share().filter(|_| preferring),
                }
            })
            .collect()
    }

    fn metrics(&self) -> openraft::RaftMetrics<crate::raft::TypeConfig> {
        self.raft.metrics().borrow_watched().clone()
    }

    fn leader_hint(&self) -> Option<lb::LeaderHint> {
        let m = self.metrics();
        let leader = m.current_leader?;
        let address = m
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.api_address.clone())
            .unwrap_or_default();
        Some(lb::LeaderHint {
            node_id: leader,
            address,
        })
    }

    /// FAILED_PRECONDITION with a leader hint unless this node leads.
    fn require_leader(&self) -> Result<(), Status> {
        let m = self.metrics();
        if crate::raft::leads(&m, self.node_id) {
            Ok(())
        } else {
            Err(bulwark_api::leader_hint::not_leader(
                self.leader_hint().as_ref(),
            ))
        }
    }

    /// Proposes a command and maps the outcome.
    async fn propose(&self, c: pb::command::Command) -> Result<u64, Status> {
        self.require_leader()?;
        match self.raft.client_write(command(SystemTime::now(), c)).await {
            Ok(resp) => match resp.data {
                Ok(()) => Ok(resp.log_id.index),
                Err(e) => Err(apply_status(e)),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                if f.leader_id.is_none_or(|l| l == self.node_id) && self.require_leader().is_ok() {
                    // Still leader, but without a fresh quorum
                    // acknowledgement (just elected, or cut off).
                    Err(Status::unavailable(
                        "the leader has no quorum acknowledgement right now; retry shortly",
                    ))
                } else {
                    Err(bulwark_api::leader_hint::not_leader(
                        self.leader_hint().as_ref(),
                    ))
                }
            }
            Err(e) => Err(Status::unavailable(format!(
                "the write was not committed: {e}"
            ))),
        }
    }

    /// Waits until this node has applied `index` and its data path runs
    /// on that state (so the response reflects the write, and a drain
    /// acknowledged here is in effect here).
    async fn applied(&self, index: u64) -> Arc<LbState> {
        let mut rx = self.sm.subscribe();
        let state = loop {
            let s = rx.borrow_and_update().clone();
            if s.applied_index() >= index || rx.changed().await.is_err() {
                break s;
            }
        };
        // The publisher runs right after apply; bound the wait anyway.
        for _ in 0..100 {
            if self.backends.load().version() >= index {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        state
    }

    /// Commits a registry change to backend `id` and answers with that
    /// backend as this node's data path now runs it.
    async fn commit_backend(
        &self,
        command: pb::command::Command,
        id: &str,
    ) -> Result<Response<lb::Backend>, Status> {
        let index = self.propose(command).await?;
        let state = self.applied(index).await;
        Ok(Response::new(self.api_backend(&state, id, false)?))
    }

    fn api_backend(
        &self,
        state: &LbState,
        id: &str,
        with_traffic: bool,
    ) -> Result<lb::Backend, Status> {
        let record = state
            .backend(id)
            .ok_or_else(|| Status::not_found(format!("backend {id:?} does not exist")))?;
        let traffic = with_traffic.then(|| self.backends.load());
        Ok(backend_to_api(record, state, traffic.as_deref()))
    }
}

/// Maps an apply-time refusal.
fn apply_status(e: ApplyError) -> Status {
    match e {
        ApplyError::NotFound { id } => Status::not_found(format!("backend {id:?} does not exist")),
        ApplyError::AlreadyExists { id } => {
            Status::already_exists(format!("backend {id:?} already exists"))
        }
        ApplyError::Malformed(m) => Status::internal(m),
    }
}

/// A client's value quoted in an error message, cut to 64 characters: the
/// message travels in a response header, and echoing a megabyte-sized
/// field there makes the client's HTTP/2 stack drop the whole connection.
pub(crate) fn clip(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// Request validation (pub for the fuzz targets): a backend id field.
pub fn check_id(id: &str) -> Result<(), Status> {
    fields::backend_id(id)
        .map(drop)
        .map_err(|why| fields::invalid("id", clip(id), &why))
}

/// Request validation: a backend address field (IP:port, neither 0).
pub fn check_address(address: &str) -> Result<SocketAddr, Status> {
    fields::backend_address(address).map_err(|why| fields::invalid("address", clip(address), &why))
}

/// Request validation: a weight field (1..=MAX_WEIGHT).
pub fn check_weight(w: u32) -> Result<u32, Status> {
    fields::weight(w).map_err(|why| fields::invalid("weight", w, &why))
}

/// Request validation: a zone field (at most 63 printable ASCII).
pub fn check_zone(zone: &str) -> Result<(), Status> {
    fields::zone(zone)
        .map(drop)
        .map_err(|why| fields::invalid("zone", clip(zone), &why))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<lb::BackendSet, Status>> + Send>>;

#[tonic::async_trait]
impl LoadBalancer for Api {
    async fn get_status(
        &self,
        request: Request<lb::GetStatusRequest>,
    ) -> Result<Response<lb::GetStatusResponse>, Status> {
        let max = match request.get_ref().max_failovers {
            0 => 10,
            n => n as usize,
        };
        let m = self.metrics();
        let state = self.sm.current();
        let members = members::list(&m, self.node_id, &self.timers);
        let leader = m.current_leader.and_then(|id| {
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| node_info(id, n))
        });
        let vip_state = self.vip.state();
        let holder = state.vip_holder();
        let vip = lb::VipStatus {
            address: self
                .vip_config
                .address
                .filter(|_| self.vip_config.mode != VipMode::Disabled)
                .map(|a| a.to_string())
                .unwrap_or_default(),
            mode: match self.vip_config.mode {
                VipMode::Disabled => lb::VipMode::Disabled,
                VipMode::Bind => lb::VipMode::Bind,
                VipMode::Arp => lb::VipMode::L2,
                VipMode::Bgp => lb::VipMode::Bgp,
            } as i32,
            interface: match self.vip_config.mode {
                VipMode::Bgp => self.vip_config.bgp_interface().to_owned(),
                _ => self.vip_config.interface.clone().unwrap_or_default(),
            },
            holder_node_id: holder.map(|h| h.node_id),
            held_since: holder.and_then(|h| h.since),
            lease_remaining: vip_state
                .lease_remaining
                .and_then(|d| bulwark_api::time::duration_to_proto(d).ok()),
            bgp: self.vip.bgp().map(|b| convert::bgp_status(&b)),
            claim_delay: bulwark_api::time::duration_to_proto(
                self.timers.claim_delay(Instant::now()),
            )
            .ok(),
        };
        let set = self.backends.load();
        let resp = lb::GetStatusResponse {
            node: Some(node_info(self.node_id, &self.node)),
            role: members::role(&m, self.node_id) as i32,
            leader,
            current_term: m.current_term,
            commit_index: m.local_committed.map_or(0, |l| l.index),
            applied_index: state.applied_index(),
            membership_changing: m.membership_config.membership().get_joint_config().len() > 1,
            members,
            vip: Some(vip),
            recent_failovers: state
                .failovers()
                .iter()
                .rev()
                .take(max)
                .map(convert::failover_to_api)
                .collect(),
            fail_open: state.data().fail_open || set.fail_open(),
            zones_down: state.data().zones_down.clone(),
            backends_total: state.backends().len() as u32,
            backends_routable: set.routable_len() as u32,
            observed_at: bulwark_api::time::timestamp_to_proto(SystemTime::now()).ok(),
            listeners: self.listener_status(&set),
        };
        Ok(Response::new(resp))
    }

    async fn list_backends(
        &self,
        request: Request<lb::ListBackendsRequest>,
    ) -> Result<Response<lb::ListBackendsResponse>, Status> {
        let zone = &request.get_ref().zone;
        let state = self.sm.current();
        let set = self.backends.load();
        let backends = state
            .backends()
            .iter()
            .filter(|b| zone.is_empty() || &b.zone == zone)
            .map(|b| backend_to_api(b, &state, Some(&set)))
            .collect();
        Ok(Response::new(lb::ListBackendsResponse {
            backends,
            applied_index: state.applied_index(),
            answered_by: self.node_id,
        }))
    }

    async fn add_backend(
        &self,
        request: Request<lb::AddBackendRequest>,
    ) -> Result<Response<lb::Backend>, Status> {
        let r = request.into_inner();
        check_id(&r.id)?;
        let address = check_address(&r.address)?;
        let weight = check_weight(r.weight.unwrap_or(100))?;
        check_zone(&r.zone)?;
        let record = pb::BackendRecord {
            id: r.id.clone(),
            address: address.to_string(),
            zone: r.zone,
            weight,
            admin_state: if r.drained {
                pb::AdminState::Drain
            } else {
                pb::AdminState::Active
            } as i32,
            drain_deadline: None,
        };
        let added = self
            .commit_backend(
                pb::command::Command::SetBackend(pb::SetBackend {
                    backend: Some(record),
                    mode: pb::SetMode::Create as i32,
                }),
                &r.id,
            )
            .await?;
        tracing::info!(backend = %r.id, %address, "backend added");
        Ok(added)
    }

    async fn remove_backend(
        &self,
        request: Request<lb::RemoveBackendRequest>,
    ) -> Result<Response<lb::RemoveBackendResponse>, Status> {
        let id = request.into_inner().id;
        check_id(&id)?;
        let index = self
            .propose(pb::command::Command::RemoveBackend(pb::RemoveBackend {
                id: id.clone(),
            }))
            .await?;
        tracing::info!(backend = %id, "backend removed");
        Ok(Response::new(lb::RemoveBackendResponse {
            log_index: index,
        }))
    }

    async fn update_backend(
        &self,
        request: Request<lb::UpdateBackendRequest>,
    ) -> Result<Response<lb::Backend>, Status> {
        let r = request.into_inner();
        check_id(&r.id)?;
        self.require_leader()?;
        let mut record = self
            .sm
            .current()
            .backend(&r.id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("backend {:?} does not exist", r.id)))?;
        if let Some(w) = r.weight {
            record.weight = check_weight(w)?;
        }
        if let Some(z) = r.zone {
            check_zone(&z)?;
            record.zone = z;
        }
        self.commit_backend(
            pb::command::Command::SetBackend(pb::SetBackend {
                backend: Some(record),
                mode: pb::SetMode::Update as i32,
            }),
            &r.id,
        )
        .await
    }

    async fn drain_backend(
        &self,
        request: Request<lb::DrainBackendRequest>,
    ) -> Result<Response<lb::Backend>, Status> {
        let r = request.into_inner();
        check_id(&r.id)?;
        let deadline = match r.max_drain_duration {
            None => None,
            Some(d) => {
                let d = bulwark_api::time::duration_from_proto(&d)
                    .map_err(|e| e.into_status("max_drain_duration"))?;
                let at = SystemTime::now() + d;
                Some(
                    bulwark_api::time::timestamp_to_proto(at)
                        .map_err(|e| e.into_status("max_drain_duration"))?,
                )
            }
        };
        let drained = self
            .commit_backend(
                pb::command::Command::SetAdminState(pb::SetAdminState {
                    id: r.id.clone(),
                    admin_state: pb::AdminState::Drain as i32,
                    drain_deadline: deadline,
                }),
                &r.id,
            )
            .await?;
        tracing::info!(backend = %r.id, "backend drained");
        Ok(drained)
    }

    async fn undrain_backend(
        &self,
        request: Request<lb::UndrainBackendRequest>,
    ) -> Result<Response<lb::Backend>, Status> {
        let id = request.into_inner().id;
        check_id(&id)?;
        let active = self
            .commit_backend(
                pb::command::Command::SetAdminState(pb::SetAdminState {
                    id: id.clone(),
                    admin_state: pb::AdminState::Active as i32,
                    drain_deadline: None,
                }),
                &id,
            )
            .await?;
        tracing::info!(backend = %id, "backend returned to service");
        Ok(active)
    }

    async fn list_members(
        &self,
        _request: Request<lb::ListMembersRequest>,
    ) -> Result<Response<lb::ListMembersResponse>, Status> {
        let m = self.metrics();
        Ok(Response::new(lb::ListMembersResponse {
            members: members::list(&m, self.node_id, &self.timers),
            leader: m.current_leader.and_then(|id| {
                m.membership_config
                    .membership()
                    .get_node(&id)
                    .map(|n| node_info(id, n))
            }),
            membership_log_index: m.membership_config.log_id().map_or(0, |l| l.index),
            membership_changing: m.membership_config.membership().get_joint_config().len() > 1,
            claim_delay: bulwark_api::time::duration_to_proto(
                self.timers.claim_delay(Instant::now()),
            )
            .ok(),
        }))
    }

    async fn add_member(
        &self,
        request: Request<lb::AddMemberRequest>,
    ) -> Result<Response<lb::AddMemberResponse>, Status> {
        members::add(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_member(
        &self,
        request: Request<lb::RemoveMemberRequest>,
    ) -> Result<Response<lb::RemoveMemberResponse>, Status> {
        members::remove(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn transfer_leadership(
        &self,
        request: Request<lb::TransferLeadershipRequest>,
    ) -> Result<Response<lb::TransferLeadershipResponse>, Status> {
        members::transfer(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_health(
        &self,
        request: Request<lb::GetHealthRequest>,
    ) -> Result<Response<lb::GetHealthResponse>, Status> {
        let only = request.into_inner().backend_id;
        self.require_leader()?;
        let status = self.health.status().ok_or_else(|| {
            Status::unavailable("this node just became leader; health aggregation is starting")
        })?;
        let state = self.sm.current();
        if !only.is_empty() && state.backend(&only).is_none() {
            return Err(Status::not_found(format!(
                "backend {only:?} does not exist"
            )));
        }
        Ok(Response::new(convert::health_to_api(status, &state, &only)))
    }
}

#[tonic::async_trait]
impl BackendWatch for Api {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<lb::WatchBackendsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        tracing::info!(watcher = %r.node_name, since = ?r.since_version, "backend watch opened");
        // The stream does the work as tonic polls it: no task of its own,
        // and it ends with the connection that owns it.
        let stream = futures::stream::unfold(
            (self.sm.subscribe(), r.since_version),
            |(mut rx, mut last)| async move {
                loop {
                    let state = rx.borrow_and_update().clone();
                    let set = backend_set(&state);
                    if last != Some(set.version) {
                        last = Some(set.version);
                        return Some((Ok(set), (rx, last)));
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The complete routable set at the applied version.
pub fn backend_set(state: &LbState) -> lb::BackendSet {
    let fail_open = state.data().fail_open;
    lb::BackendSet {
        version: state.applied_index(),
        backends: state
            .backends()
            .iter()
            .map(|b| backend_entry(b, state.verdict(&b.id), fail_open))
            .collect(),
        fail_open,
        zones_down: state.data().zones_down.clone(),
        generated_at: bulwark_api::time::timestamp_to_proto(SystemTime::now()).ok(),
    }
}

/// Ids of the current voters.
fn voters(m: &openraft::RaftMetrics<crate::raft::TypeConfig>) -> BTreeSet<NodeId> {
    m.membership_config.membership().voter_ids().collect()
}

/// A wait for cluster changes: polls the metrics until `done` or the
/// deadline (metrics changes wake it early).
async fn wait_metrics<F>(raft: &Raft, timeout: Duration, mut done: F) -> bool
where
    F: FnMut(&openraft::RaftMetrics<crate::raft::TypeConfig>) -> bool,
{
    let mut rx = raft.metrics();
    let deadline = Instant::now() + timeout;
    loop {
        if done(&rx.borrow_watched()) {
            return true;
        }
        let tick = tokio::time::sleep(Duration::from_millis(20));
        tokio::select! {
            _ = rx.changed() => {}
            () = tick => {}
            () = tokio::time::sleep_until(deadline) => return done(&rx.borrow_watched()),
        }
    }
}
