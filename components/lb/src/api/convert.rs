//! Replicated records -> API messages.

use bulwark_api::lb::v1 as lb;
use bulwark_api::raft::v1 as pb;

use crate::backends::BackendSet;
use crate::health::{HealthStatus, View};
use crate::raft::NodeId;
use crate::raft::state::LbState;
use crate::raft::types::LbNode;
use crate::vip::bgp::bfd::BfdStatus;
use crate::vip::bgp::bfd::packet::State;
use crate::vip::bgp::session::SessionState;
use crate::vip::bgp::{BgpStatus, Event};

/// bgp mode: the speaker's sessions and last announce and withdrawal.
pub fn bgp_status(b: &BgpStatus) -> lb::BgpStatus {
    let ts = |t: std::time::SystemTime| bulwark_api::time::timestamp_to_proto(t).ok();
    let event = |e: &Event| lb::BgpEvent {
        at: ts(e.at),
        reason: e.reason.clone(),
    };
    lb::BgpStatus {
        peers: b
            .peers
            .iter()
            .map(|(c, s)| lb::BgpPeer {
                address: std::net::SocketAddr::new(c.address, c.port).to_string(),
                asn: c.asn,
                state: match s.state {
                    SessionState::Idle => lb::BgpSessionState::Idle,
                    SessionState::Connect => lb::BgpSessionState::Connect,
                    SessionState::OpenSent => lb::BgpSessionState::OpenSent,
                    SessionState::OpenConfirm => lb::BgpSessionState::OpenConfirm,
                    SessionState::Established => lb::BgpSessionState::Established,
                } as i32,
                announced: s.announced.iter().map(ToString::to_string).collect(),
                last_error: s.last_error.clone().unwrap_or_default(),
                established_since: s.established_since.and_then(ts),
                bfd: s.bfd.as_ref().map(bfd_session),
            })
            .collect(),
        last_announce: b.last_announce.as_ref().map(event),
        last_withdraw: b.last_withdraw.as_ref().map(event),
    }
}

/// A BFD session as the API shows it.
fn bfd_session(b: &BfdStatus) -> lb::BfdSession {
    let state = |s: State| match s {
        State::AdminDown => lb::BfdState::AdminDown,
        State::Down => lb::BfdState::Down,
        State::Init => lb::BfdState::Init,
        State::Up => lb::BfdState::Up,
    } as i32;
    let change = b.last_change.as_ref();
    lb::BfdSession {
        state: state(b.state),
        remote_state: state(b.remote_state),
        last_change_at: change.and_then(|c| bulwark_api::time::timestamp_to_proto(c.at).ok()),
        last_change_from: change.map_or(0, |c| state(c.from)),
        last_change_diag: change.map_or_else(String::new, |c| c.diag.describe().to_owned()),
        downs: b.downs,
        detection_time: prost_types::Duration::try_from(b.detection_time).ok(),
        error: b.error.clone().unwrap_or_default(),
    }
}

/// A node record as the API shows it.
pub fn node_info(id: NodeId, n: &LbNode) -> lb::NodeInfo {
    lb::NodeInfo {
        id,
        name: n.name.clone(),
        raft_address: n.raft_address.clone(),
        api_address: n.api_address.clone(),
        proxy_address: n.proxy_address.clone(),
        zone: n.zone.clone(),
    }
}

/// The committed verdict; no record means UNKNOWN (routable).
pub fn verdict_status(v: Option<&pb::VerdictRecord>) -> lb::VerdictStatus {
    match v {
        Some(v) => lb::VerdictStatus {
            verdict: verdict(v.verdict) as i32,
            reason: v.reason.clone(),
            since: v.since,
        },
        None => lb::VerdictStatus {
            verdict: lb::Verdict::Unknown as i32,
            reason: "no health verdict yet".into(),
            since: None,
        },
    }
}

fn verdict(v: i32) -> lb::Verdict {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Up) => lb::Verdict::Up,
        Ok(pb::Verdict::NotReady) => lb::Verdict::NotReady,
        Ok(pb::Verdict::Down) => lb::Verdict::Down,
        _ => lb::Verdict::Unknown,
    }
}

fn admin(a: i32) -> lb::AdminState {
    if a == pb::AdminState::Drain as i32 {
        lb::AdminState::Drain
    } else {
        lb::AdminState::Active
    }
}

/// Whether the cluster routes new connections to the backend.
fn routable(b: &pb::BackendRecord, v: Option<&pb::VerdictRecord>, fail_open: bool) -> bool {
    let active = admin(b.admin_state) == lb::AdminState::Active;
    let healthy = matches!(
        v.map_or(lb::Verdict::Unknown, |v| verdict(v.verdict)),
        lb::Verdict::Up | lb::Verdict::Unknown
    );
    active && (healthy || fail_open)
}

/// A backend with its verdict and, when a snapshot is given, this node's
/// traffic counters.
pub fn backend_to_api(
    b: &pb::BackendRecord,
    state: &LbState,
    set: Option<&BackendSet>,
) -> lb::Backend {
    let v = state.verdict(&b.id);
    let live = set.and_then(|s| s.by_id(&b.id));
    lb::Backend {
        id: b.id.clone(),
        address: b.address.clone(),
        zone: b.zone.clone(),
        weight: b.weight,
        admin_state: admin(b.admin_state) as i32,
        drain_deadline: b.drain_deadline,
        verdict: Some(verdict_status(v)),
        routable: live.map_or_else(
            || routable(b, v, state.data().fail_open),
            |l| l.is_eligible(),
        ),
        traffic: live.map(|l| {
            let s = l.stats().snapshot();
            lb::BackendTraffic {
                active_connections: s.active_connections,
                total_connections: s.total_connections,
                bytes_client_to_backend: s.bytes_in,
                bytes_backend_to_client: s.bytes_out,
                connect_errors: s.connect_errors,
                last_connect_error_at: s
                    .last_connect_error_at
                    .and_then(|t| bulwark_api::time::timestamp_to_proto(t).ok()),
                avoided: s.avoided,
            }
        }),
    }
}

/// One entry of the watched backend set.
pub fn backend_entry(
    b: &pb::BackendRecord,
    v: Option<&pb::VerdictRecord>,
    fail_open: bool,
) -> lb::BackendEntry {
    lb::BackendEntry {
        id: b.id.clone(),
        address: b.address.clone(),
        zone: b.zone.clone(),
        weight: b.weight,
        verdict: v.map_or(lb::Verdict::Unknown, |v| verdict(v.verdict)) as i32,
        admin_state: admin(b.admin_state) as i32,
        routable: routable(b, v, fail_open),
        drain_deadline: b.drain_deadline,
    }
}

/// A failover record as the API shows it.
pub fn failover_to_api(f: &pb::FailoverRecord) -> lb::Failover {
    lb::Failover {
        at: f.at,
        from_node_id: f.from_node_id,
        to_node_id: f.to_node_id,
        term: f.term,
        cause: match pb::FailoverCause::try_from(f.cause) {
            Ok(pb::FailoverCause::Startup) => lb::FailoverCause::Startup,
            Ok(pb::FailoverCause::LeaderLost) => lb::FailoverCause::LeaderLost,
            Ok(pb::FailoverCause::LeaseLost) => lb::FailoverCause::LeaseLost,
            Ok(pb::FailoverCause::Transfer) => lb::FailoverCause::Transfer,
            _ => lb::FailoverCause::Unspecified,
        } as i32,
        time_to_detect: f.time_to_detect,
        time_to_move_vip: f.time_to_move_vip,
    }
}

/// The aggregator's picture with the committed verdicts, for GetHealth;
/// `only` limits it to one backend (empty: all).
pub fn health_to_api(status: HealthStatus, state: &LbState, only: &str) -> lb::GetHealthResponse {
    let view = |v: Option<View>| match v {
        Some(View::Up) => lb::Verdict::Up,
        Some(View::NotReady) => lb::Verdict::NotReady,
        Some(View::Down) => lb::Verdict::Down,
        None => lb::Verdict::Unknown,
    } as i32;
    let backends = status
        .backends
        .into_iter()
        .filter(|b| only.is_empty() || b.id == only)
        .map(|b| lb::BackendHealth {
            verdict: Some(verdict_status(state.verdict(&b.id))),
            zones: b
                .zones
                .into_iter()
                .map(|z| lb::ZoneVotes {
                    zone: z.zone,
                    zone_verdict: view(z.view),
                    up: z.tally.up,
                    not_ready: z.tally.not_ready,
                    down: z.tally.down,
                    ignored: z.tally.ignored,
                })
                .collect(),
            probers: b
                .probers
                .into_iter()
                .map(|p| lb::ProberView {
                    prober: p.node_name,
                    zone: p.zone,
                    counted: p.counted,
                    latest: p.latest,
                })
                .collect(),
            backend_id: b.id,
            address: b.address,
            zone: b.zone,
        })
        .collect();
    let probers = status
        .probers
        .into_iter()
        .map(|p| lb::ProberStatus {
            node_name: p.node_name,
            zone: p.zone,
            isolated: p.isolated,
            stale: p.stale,
            last_report_age: bulwark_api::time::duration_to_proto(p.last_report_age).ok(),
            last_sequence: p.last_sequence,
        })
        .collect();
    lb::GetHealthResponse {
        backends,
        probers,
        fail_open: status.fail_open,
        zones_down: status.zones_down,
    }
}
