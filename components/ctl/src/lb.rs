//! `bulwarkctl lb …`: bulwark-lb's operator API. Reads go to any endpoint;
//! writes follow the leader hint a follower answers with (see
//! [`crate::connect`]).

use std::net::SocketAddr;
use std::time::Duration;

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use bulwark_lb::api::fields;
use clap::Subcommand;
use serde::Serialize;

use crate::connect::Service;
use crate::error::{CliError, Exit};
use crate::output::{self, OutputFormat, duration_text, enum_name, seconds};

/// `bulwarkctl lb …`
#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// Leader, term, members, VIP holder and recent failovers.
    Status,
    /// Registered backends with verdicts and this node's traffic.
    Backends {
        /// Only this zone.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Stop sending new connections to a backend (existing ones continue).
    Drain {
        /// Backend id.
        id: String,
        /// Close the connections still open after this long (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_duration: Option<Duration>,
    },
    /// Return a drained backend to service.
    Undrain {
        /// Backend id.
        id: String,
    },
    /// Register an apiserver backend.
    AddBackend {
        /// Backend id (a lowercase DNS name, e.g. the node name).
        #[arg(value_parser = fields::backend_id)]
        id: String,
        /// IP:port of the apiserver.
        #[arg(long, value_parser = fields::backend_address)]
        address: SocketAddr,
        /// Zone of the backend.
        #[arg(long, default_value = "", value_parser = fields::zone)]
        zone: String,
        /// Relative weight, 1-10000 (default 100).
        #[arg(long, value_parser = weight)]
        weight: Option<u32>,
        /// Register it drained.
        #[arg(long)]
        drained: bool,
    },
    /// Change a registered backend's weight or zone (its address is
    /// changed by removing and adding it).
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true)))]
    UpdateBackend {
        /// Backend id.
        #[arg(value_parser = fields::backend_id)]
        id: String,
        /// New relative weight, 1-10000.
        #[arg(long, group = "change", value_parser = weight)]
        weight: Option<u32>,
        /// New zone ("" for none).
        #[arg(long, group = "change", value_parser = fields::zone)]
        zone: Option<String>,
    },
    /// Unregister a backend.
    RemoveBackend {
        /// Backend id.
        id: String,
    },
    /// The Raft members.
    Members,
    /// Add a node to the Raft group (learner, catch up, then voter).
    AddMember {
        /// Raft node id (never reused).
        #[arg(long, value_parser = node_id)]
        id: u64,
        /// Host name.
        #[arg(long, default_value = "")]
        name: String,
        /// Raft address, host:port.
        #[arg(long, value_parser = fields::host_port)]
        raft_address: String,
        /// API address, host:port.
        #[arg(long, value_parser = fields::host_port)]
        api_address: String,
        /// Node-local proxy address, host:port.
        #[arg(long, default_value = "", value_parser = proxy_address)]
        proxy_address: String,
        /// Zone.
        #[arg(long, default_value = "", value_parser = fields::zone)]
        zone: String,
        /// Keep it a learner.
        #[arg(long)]
        stay_learner: bool,
        /// How long it may take to catch up (default 60s).
        #[arg(long, value_parser = humantime::parse_duration)]
        catch_up_timeout: Option<Duration>,
    },
    /// Remove a node from the Raft group.
    RemoveMember {
        /// Raft node id.
        id: u64,
        /// Remove even if the remaining voters reachable now are no quorum.
        #[arg(long)]
        force: bool,
    },
    /// Hand leadership (and the VIP) to another voter.
    TransferLeadership {
        /// The voter to hand over to; default the most up-to-date one.
        #[arg(long)]
        to: Option<u64>,
    },
}

/// `--weight`: a number the LB's own check accepts.
fn weight(s: &str) -> Result<u32, String> {
    let w = s
        .parse::<u32>()
        .map_err(|_| "not a whole number".to_owned())?;
    fields::weight(w)
}

/// `--id` of a new member: a number the LB's own check accepts.
fn node_id(s: &str) -> Result<u64, String> {
    let id = s
        .parse::<u64>()
        .map_err(|_| "not a whole number".to_owned())?;
    fields::node_id(id)
}

/// `--proxy-address`: host:port, or empty for none.
fn proxy_address(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Ok(String::new())
    } else {
        fields::host_port(s)
    }
}

fn ts(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.and_then(|t| bulwark_api::time::timestamp_from_proto(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

/// An absent value in a table cell.
fn cell<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn pb_duration(d: Duration) -> Result<prost_types::Duration, CliError> {
    bulwark_api::time::duration_to_proto(d).map_err(|e| CliError::new(Exit::Usage, e.to_string()))
}

#[derive(Serialize)]
struct StatusView {
    node: String,
    role: String,
    leader: Option<String>,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    vip: String,
    vip_holder: Option<u64>,
    held_since: Option<String>,
    backends: String,
    listeners: Vec<ListenerView>,
    failovers: Vec<FailoverView>,
    /// bgp mode: this node's sessions; absent in other modes.
    #[serde(skip_serializing_if = "Option::is_none")]
    bgp: Option<BgpView>,
}

/// bgp mode: the answering node's sessions and last announce/withdrawal.
#[derive(Serialize)]
struct BgpView {
    peers: Vec<BgpPeerView>,
    /// Null when there was none since start.
    last_announce: Option<BgpEventView>,
    last_withdraw: Option<BgpEventView>,
}

/// An announce or withdrawal: when (null if unknown) and why.
#[derive(Serialize)]
struct BgpEventView {
    at: Option<String>,
    reason: String,
}

impl BgpEventView {
    fn of(e: &lb::BgpEvent) -> Self {
        Self {
            at: ts(e.at.as_ref()),
            reason: e.reason.clone(),
        }
    }

    /// `when (why)` for the table; `-` for none.
    fn cell(e: Option<&Self>) -> String {
        e.map_or_else(
            || "-".into(),
            |e| format!("{} ({})", cell(e.at.as_deref()), e.reason),
        )
    }
}

#[derive(Serialize)]
struct BgpPeerView {
    address: String,
    asn: u32,
    state: String,
    announced: Vec<String>,
    last_error: String,
    /// Null when BFD is off for this peer.
    bfd: Option<BfdView>,
}

/// A peer's BFD session.
#[derive(Serialize)]
struct BfdView {
    state: String,
    remote_state: String,
    /// The last state change: when (null if none), from what, and the
    /// diagnostic after it.
    last_change_at: Option<String>,
    last_change_from: String,
    last_change_diag: String,
    downs: u64,
    detection_time_seconds: Option<f64>,
    error: String,
}

impl BfdView {
    fn of(b: &lb::BfdSession) -> Self {
        let name = |s| enum_name(s, lb::BfdState::as_str_name, "BFD_STATE_");
        Self {
            state: name(b.state),
            remote_state: name(b.remote_state),
            last_change_at: ts(b.last_change_at.as_ref()),
            last_change_from: name(b.last_change_from),
            last_change_diag: b.last_change_diag.clone(),
            downs: b.downs,
            detection_time_seconds: output::seconds(b.detection_time.as_ref()),
            error: b.error.clone(),
        }
    }

    /// `up (detect 300ms)`, `down since <when>: <diag>`, or the error.
    fn cell(b: Option<&Self>) -> String {
        let Some(b) = b else {
            return "-".into();
        };
        if !b.error.is_empty() {
            return format!("{}: {}", b.state, b.error);
        }
        if b.state == "up" {
            return format!(
                "up (detect {})",
                output::duration_text(b.detection_time_seconds)
            );
        }
        match &b.last_change_at {
            Some(at) => format!("{} since {at}: {}", b.state, b.last_change_diag),
            None => b.state.clone(),
        }
    }
}

impl BgpView {
    fn of(b: &lb::BgpStatus) -> Self {
        Self {
            peers: b
                .peers
                .iter()
                .map(|p| BgpPeerView {
                    address: p.address.clone(),
                    asn: p.asn,
                    state: enum_name(
                        p.state,
                        lb::BgpSessionState::as_str_name,
                        "BGP_SESSION_STATE_",
                    ),
                    announced: p.announced.clone(),
                    last_error: p.last_error.clone(),
                    bfd: p.bfd.as_ref().map(BfdView::of),
                })
                .collect(),
            last_announce: b.last_announce.as_ref().map(BgpEventView::of),
            last_withdraw: b.last_withdraw.as_ref().map(BgpEventView::of),
        }
    }
}

/// A proxy listener's routing mode as the config spells it.
#[derive(Serialize)]
struct ListenerView {
    name: String,
    address: String,
    routing: String,
    local_zone: String,
    spilled_over: bool,
    local_share: Option<f64>,
}

impl ListenerView {
    fn of(l: &lb::ListenerStatus) -> Self {
        Self {
            name: l.name.clone(),
            address: l.address.clone(),
            routing: match lb::RoutingMode::try_from(l.routing) {
                Ok(lb::RoutingMode::Balanced) => "balanced".into(),
                Ok(lb::RoutingMode::ZonePreferred) => "zonePreferred".into(),
                Ok(lb::RoutingMode::Unspecified) => "-".into(),
                Err(_) => l.routing.to_string(),
            },
            local_zone: l.local_zone.clone(),
            spilled_over: l.spilled_over,
            local_share: l.local_share,
        }
    }

    /// e.g. `zonePreferred (zone a, spilled over: 33% of it routable) on 127.0.0.1:7445`.
    fn line(&self) -> String {
        let mut out = self.routing.clone();
        if self.routing == "zonePreferred" {
            let share = self
                .local_share
                .map(|s| format!(": {:.0}% of it routable", s * 100.0))
                .unwrap_or_default();
            if self.local_zone.is_empty() {
                out.push_str(" (no zone: spread over all)");
            } else if self.spilled_over {
                out.push_str(&format!(" (zone {}, spilled over{share})", self.local_zone));
            } else {
                out.push_str(&format!(" (zone {})", self.local_zone));
            }
        }
        format!("{out} on {}", self.address)
    }
}

#[derive(Serialize)]
struct FailoverView {
    at: Option<String>,
    from: Option<u64>,
    to: u64,
    term: u64,
    cause: String,
    time_to_detect_seconds: Option<f64>,
    time_to_move_vip_seconds: Option<f64>,
}

#[derive(Serialize)]
struct BackendView {
    id: String,
    address: String,
    zone: String,
    weight: u32,
    admin: String,
    verdict: String,
    routable: bool,
    active_connections: u64,
    total_connections: u64,
    connect_errors: u64,
    /// RFC 3339, to the second.
    last_connect_error_at: Option<String>,
    /// New connections on the answering node prefer the other backends.
    avoided: bool,
}

#[derive(Serialize)]
struct MemberView {
    id: u64,
    name: String,
    role: String,
    raft_address: String,
    api_address: String,
    zone: String,
    matched_index: Option<u64>,
    lag: Option<u64>,
    last_ack_age_seconds: Option<f64>,
    /// Its fence timers as the answering node heard them (docs/FAILOVER.md).
    fence_hold_seconds: Option<f64>,
    election_timeout_max_seconds: Option<f64>,
}

/// One `routing <listener>:` line per listener.
fn routing_fields(listeners: &[ListenerView]) -> String {
    let lines: Vec<(String, String)> = listeners
        .iter()
        .map(|l| (format!("routing {}", l.name), l.line()))
        .collect();
    let pairs: Vec<(&str, String)> = lines.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    output::fields(&pairs)
}

fn node_name(n: Option<&lb::NodeInfo>) -> String {
    n.map(|n| format!("{} ({})", n.id, n.name))
        .unwrap_or_else(|| "-".into())
}

fn backend_view(b: &lb::Backend) -> BackendView {
    let t = b.traffic.unwrap_or_default();
    BackendView {
        id: b.id.clone(),
        address: b.address.clone(),
        zone: b.zone.clone(),
        weight: b.weight,
        admin: enum_name(b.admin_state, lb::AdminState::as_str_name, "ADMIN_STATE_"),
        verdict: b
            .verdict
            .as_ref()
            .map(|v| enum_name(v.verdict, lb::Verdict::as_str_name, "VERDICT_"))
            .unwrap_or_else(|| "-".into()),
        routable: b.routable,
        active_connections: t.active_connections,
        total_connections: t.total_connections,
        connect_errors: t.connect_errors,
        last_connect_error_at: ts(t.last_connect_error_at.as_ref()),
        avoided: t.avoided,
    }
}

fn member_view(m: &lb::Member) -> MemberView {
    let n = m.node.clone().unwrap_or_default();
    let r = m.replication;
    MemberView {
        id: n.id,
        name: n.name,
        role: enum_name(m.role, lb::MemberRole::as_str_name, "MEMBER_ROLE_"),
        raft_address: n.raft_address,
        api_address: n.api_address,
        zone: n.zone,
        matched_index: r.and_then(|r| r.matched_index),
        lag: r.map(|r| r.lag_entries),
        last_ack_age_seconds: r.and_then(|r| seconds(r.last_ack_age.as_ref())),
        fence_hold_seconds: m.fence_timers.and_then(|t| seconds(t.hold.as_ref())),
        election_timeout_max_seconds: m
            .fence_timers
            .and_then(|t| seconds(t.election_timeout_max.as_ref())),
    }
}

fn print_backends(format: OutputFormat, rows: &[BackendView]) -> Result<(), CliError> {
    output::print(format, &rows, |rows| render_backends(rows))
}

fn render_backends(rows: &[BackendView]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.address.clone(),
                b.zone.clone(),
                b.weight.to_string(),
                b.admin.clone(),
                b.verdict.clone(),
                if b.routable {
                    "yes".into()
                } else {
                    "no".into()
                },
                b.active_connections.to_string(),
                b.total_connections.to_string(),
                b.connect_errors.to_string(),
                cell(b.last_connect_error_at.as_ref()),
                if b.avoided { "yes".into() } else { "no".into() },
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "ADDRESS",
            "ZONE",
            "WEIGHT",
            "ADMIN",
            "VERDICT",
            "ROUTABLE",
            "ACTIVE",
            "TOTAL",
            "CONNECT-ERRORS",
            "LAST-CONNECT-ERROR",
            "AVOIDED",
        ],
        &cells,
    )
}

impl LbCommand {
    /// Runs the command against `svc`.
    pub async fn run(&self, svc: &Service<'_>, format: OutputFormat) -> Result<(), CliError> {
        match self {
            LbCommand::Status => status(svc, format).await,
            LbCommand::Backends { zone } => backends(svc, format, zone.as_deref()).await,
            LbCommand::Drain { id, max_duration } => drain(svc, format, id, *max_duration).await,
            LbCommand::Undrain { id } => undrain(svc, format, id).await,
            LbCommand::AddBackend {
                id,
                address,
                zone,
                weight,
                drained,
            } => {
                let req = lb::AddBackendRequest {
                    id: id.clone(),
                    address: address.to_string(),
                    zone: zone.clone(),
                    weight: *weight,
                    drained: *drained,
                };
                change_backend(svc, format, req, |mut c, r| async move {
                    c.add_backend(r).await
                })
                .await
            }
            LbCommand::UpdateBackend { id, weight, zone } => {
                let req = lb::UpdateBackendRequest {
                    id: id.clone(),
                    weight: *weight,
                    zone: zone.clone(),
                };
                change_backend(svc, format, req, |mut c, r| async move {
                    c.update_backend(r).await
                })
                .await
            }
            LbCommand::RemoveBackend { id } => remove_backend(svc, format, id).await,
            LbCommand::Members => members(svc, format).await,
            LbCommand::AddMember {
                id,
                name,
                raft_address,
                api_address,
                proxy_address,
                zone,
                stay_learner,
                catch_up_timeout,
            } => {
                let req = lb::AddMemberRequest {
                    node: Some(lb::NodeInfo {
                        id: *id,
                        name: name.clone(),
                        raft_address: raft_address.clone(),
                        api_address: api_address.clone(),
                        proxy_address: proxy_address.clone(),
                        zone: zone.clone(),
                    }),
                    stay_learner: *stay_learner,
                    catch_up_timeout: catch_up_timeout.map(pb_duration).transpose()?,
                };
                add_member(svc, format, req).await
            }
            LbCommand::RemoveMember { id, force } => remove_member(svc, format, *id, *force).await,
            LbCommand::TransferLeadership { to } => transfer_leadership(svc, format, *to).await,
        }
    }
}

/// `lb status`.
async fn status(svc: &Service<'_>, format: OutputFormat) -> Result<(), CliError> {
    let s = get_status(svc, 0).await?;
    output::print(format, &status_view(&s), render_status)
}

/// The LB node's GetStatus with up to `max_failovers` recent failovers
/// (0: the server's default), for `lb status` and the `status` overview.
pub(crate) async fn get_status(
    svc: &Service<'_>,
    max_failovers: u32,
) -> Result<lb::GetStatusResponse, CliError> {
    let req = lb::GetStatusRequest { max_failovers };
    svc.send(LoadBalancerClient::new, req, |mut c, r| async move {
        c.get_status(r).await
    })
    .await
}

fn status_view(s: &lb::GetStatusResponse) -> StatusView {
    let vip = s.vip.clone().unwrap_or_default();
    StatusView {
        node: node_name(s.node.as_ref()),
        role: enum_name(s.role, lb::NodeRole::as_str_name, "NODE_ROLE_"),
        leader: s.leader.as_ref().map(|n| node_name(Some(n))),
        term: s.current_term,
        commit_index: s.commit_index,
        applied_index: s.applied_index,
        vip: if vip.address.is_empty() {
            "disabled".into()
        } else {
            format!(
                "{} ({})",
                vip.address,
                enum_name(vip.mode, lb::VipMode::as_str_name, "VIP_MODE_")
            )
        },
        vip_holder: vip.holder_node_id,
        held_since: ts(vip.held_since.as_ref()),
        backends: format!("{}/{} routable", s.backends_routable, s.backends_total),
        listeners: s.listeners.iter().map(ListenerView::of).collect(),
        bgp: vip.bgp.as_ref().map(BgpView::of),
        failovers: s
            .recent_failovers
            .iter()
            .map(|f| FailoverView {
                at: ts(f.at.as_ref()),
                from: f.from_node_id,
                to: f.to_node_id,
                term: f.term,
                cause: enum_name(f.cause, lb::FailoverCause::as_str_name, "FAILOVER_CAUSE_"),
                time_to_detect_seconds: seconds(f.time_to_detect.as_ref()),
                time_to_move_vip_seconds: seconds(f.time_to_move_vip.as_ref()),
            })
            .collect(),
    }
}

/// bgp mode: the last announce and withdrawal, then a row per peer.
fn render_bgp(b: &BgpView) -> String {
    let mut out = output::fields(&[
        (
            "bgp last announce",
            BgpEventView::cell(b.last_announce.as_ref()),
        ),
        (
            "bgp last withdraw",
            BgpEventView::cell(b.last_withdraw.as_ref()),
        ),
    ]);
    out.push_str("\nbgp peers:\n");
    let cells: Vec<Vec<String>> = b
        .peers
        .iter()
        .map(|p| {
            vec![
                p.address.clone(),
                p.asn.to_string(),
                p.state.clone(),
                if p.announced.is_empty() {
                    "-".into()
                } else {
                    p.announced.join(",")
                },
                BfdView::cell(p.bfd.as_ref()),
                if p.last_error.is_empty() {
                    "-".into()
                } else {
                    p.last_error.clone()
                },
            ]
        })
        .collect();
    out.push_str(&output::table(
        &["PEER", "ASN", "STATE", "ANNOUNCED", "BFD", "LAST ERROR"],
        &cells,
    ));
    out
}

/// `lb status` as a table: the node's fields, then its recent failovers.
fn render_status(v: &StatusView) -> String {
    let mut out = output::fields(&[
        ("node", v.node.clone()),
        ("role", v.role.clone()),
        ("leader", cell(v.leader.as_ref())),
        ("term", v.term.to_string()),
        ("commit index", v.commit_index.to_string()),
        ("applied index", v.applied_index.to_string()),
        ("vip", v.vip.clone()),
        ("vip holder", cell(v.vip_holder)),
        ("held since", cell(v.held_since.as_ref())),
        ("backends", v.backends.clone()),
    ]);
    out.push_str(&routing_fields(&v.listeners));
    if let Some(b) = &v.bgp {
        out.push_str(&render_bgp(b));
    }
    if !v.failovers.is_empty() {
        out.push_str("\nrecent failovers:\n");
        let cells: Vec<Vec<String>> = v
            .failovers
            .iter()
            .map(|f| {
                vec![
                    cell(f.at.as_ref()),
                    cell(f.from),
                    f.to.to_string(),
                    f.term.to_string(),
                    f.cause.clone(),
                    duration_text(f.time_to_detect_seconds),
                    duration_text(f.time_to_move_vip_seconds),
                ]
            })
            .collect();
        out.push_str(&output::table(
            &["AT", "FROM", "TO", "TERM", "CAUSE", "DETECT", "MOVE"],
            &cells,
        ));
    }
    out
}

/// `lb backends [--zone Z]`.
async fn backends(
    svc: &Service<'_>,
    format: OutputFormat,
    zone: Option<&str>,
) -> Result<(), CliError> {
    let req = lb::ListBackendsRequest {
        zone: zone.unwrap_or_default().to_owned(),
    };
    let list = svc
        .send(LoadBalancerClient::new, req, |mut c, r| async move {
            c.list_backends(r).await
        })
        .await?;
    let rows: Vec<BackendView> = list.backends.iter().map(backend_view).collect();
    print_backends(format, &rows)
}

/// `lb drain ID [--max-duration D]`.
async fn drain(
    svc: &Service<'_>,
    format: OutputFormat,
    id: &str,
    max_duration: Option<Duration>,
) -> Result<(), CliError> {
    let req = lb::DrainBackendRequest {
        id: id.to_owned(),
        max_drain_duration: max_duration.map(pb_duration).transpose()?,
    };
    change_backend(svc, format, req, |mut c, r| async move {
        c.drain_backend(r).await
    })
    .await
}

/// `lb undrain ID`.
async fn undrain(svc: &Service<'_>, format: OutputFormat, id: &str) -> Result<(), CliError> {
    let req = lb::UndrainBackendRequest { id: id.to_owned() };
    change_backend(svc, format, req, |mut c, r| async move {
        c.undrain_backend(r).await
    })
    .await
}

/// Sends a change of one backend (drain, undrain, add, update) with `rpc`
/// and prints the backend as the answer gives it.
async fn change_backend<Req, Fut>(
    svc: &Service<'_>,
    format: OutputFormat,
    req: Req,
    rpc: impl Fn(LoadBalancerClient<tonic::transport::Channel>, Req) -> Fut,
) -> Result<(), CliError>
where
    Req: Clone,
    Fut: std::future::Future<Output = Result<tonic::Response<lb::Backend>, tonic::Status>>,
{
    let b = svc.send(LoadBalancerClient::new, req, rpc).await?;
    print_backends(format, &[backend_view(&b)])
}

/// `lb remove-backend ID`.
async fn remove_backend(svc: &Service<'_>, format: OutputFormat, id: &str) -> Result<(), CliError> {
    let req = lb::RemoveBackendRequest { id: id.to_owned() };
    let r = svc
        .send(LoadBalancerClient::new, req, |mut c, r| async move {
            c.remove_backend(r).await
        })
        .await?;
    #[derive(Serialize)]
    struct Removed {
        id: String,
        log_index: u64,
    }
    output::print(
        format,
        &Removed {
            id: id.to_owned(),
            log_index: r.log_index,
        },
        |r| format!("backend {} removed (log index {})\n", r.id, r.log_index),
    )
}

/// `lb members`.
async fn members(svc: &Service<'_>, format: OutputFormat) -> Result<(), CliError> {
    let list = svc
        .send(
            LoadBalancerClient::new,
            lb::ListMembersRequest {},
            |mut c, r| async move { c.list_members(r).await },
        )
        .await?;
    let rows: Vec<MemberView> = list.members.iter().map(member_view).collect();
    let leader = list.leader.as_ref().map(|l| l.id);
    let delay = seconds(list.claim_delay.as_ref());
    output::print(format, &rows, |rows| {
        render_members(rows, leader) + &claim_delay_note(rows, delay)
    })
}

/// Under the table, when a VIP claim would wait: why, and what to do.
fn claim_delay_note(rows: &[MemberView], delay: Option<f64>) -> String {
    let Some(delay) = delay.filter(|d| *d > 0.0) else {
        return String::new();
    };
    let timers: std::collections::BTreeSet<String> = rows.iter().map(fence_cell).collect();
    let why = if timers.len() > 1 {
        "the members run different fence timers (FENCE: the hold, then \
         raft.electionTimeoutMax); set the same vip.* and raft.* timers on every node"
    } else {
        "vip.lease is too long for raft.electionTimeoutMax"
    };
    format!(
        "note: a new leader waits {} before it takes the VIP: {why} (docs/FAILOVER.md)\n",
        duration_text(Some(delay))
    )
}

/// A member's hold and election timeout, `186ms/220ms`; `-` when unknown.
fn fence_cell(m: &MemberView) -> String {
    match (m.fence_hold_seconds, m.election_timeout_max_seconds) {
        (Some(h), Some(f)) => format!("{}/{}", duration_text(Some(h)), duration_text(Some(f))),
        _ => "-".into(),
    }
}

/// `lb members` as a table, the leader starred.
fn render_members(rows: &[MemberView], leader: Option<u64>) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|m| {
            vec![
                if Some(m.id) == leader {
                    "*".into()
                } else {
                    String::new()
                },
                m.id.to_string(),
                m.name.clone(),
                m.role.clone(),
                m.raft_address.clone(),
                m.api_address.clone(),
                m.zone.clone(),
                cell(m.matched_index),
                cell(m.lag),
                duration_text(m.last_ack_age_seconds),
                fence_cell(m),
            ]
        })
        .collect();
    output::table(
        &[
            "LEADER", "ID", "NAME", "ROLE", "RAFT", "API", "ZONE", "MATCHED", "LAG", "LAST-ACK",
            "FENCE",
        ],
        &cells,
    )
}

/// `lb add-member`.
async fn add_member(
    svc: &Service<'_>,
    format: OutputFormat,
    req: lb::AddMemberRequest,
) -> Result<(), CliError> {
    let r = svc
        .send(LoadBalancerClient::new, req, |mut c, r| async move {
            c.add_member(r).await
        })
        .await?;
    let rows: Vec<MemberView> = r.member.iter().map(member_view).collect();
    output::print(format, &rows, |rows| {
        rows.iter()
            .map(|m| {
                format!(
                    "node {} added as {} (membership log index {})\n",
                    m.id, m.role, r.membership_log_index
                )
            })
            .collect()
    })
}

/// `lb remove-member ID [--force]`.
async fn remove_member(
    svc: &Service<'_>,
    format: OutputFormat,
    id: u64,
    force: bool,
) -> Result<(), CliError> {
    let req = lb::RemoveMemberRequest { node_id: id, force };
    let r = svc
        .send(LoadBalancerClient::new, req, |mut c, r| async move {
            c.remove_member(r).await
        })
        .await?;
    #[derive(Serialize)]
    struct Removed {
        id: u64,
        membership_log_index: u64,
    }
    output::print(
        format,
        &Removed {
            id,
            membership_log_index: r.membership_log_index,
        },
        |r| {
            format!(
                "node {} removed (membership log index {})\n",
                r.id, r.membership_log_index
            )
        },
    )
}

/// `lb transfer-leadership [--to ID]`.
async fn transfer_leadership(
    svc: &Service<'_>,
    format: OutputFormat,
    to: Option<u64>,
) -> Result<(), CliError> {
    let req = lb::TransferLeadershipRequest { to_node_id: to };
    let r = svc
        .send(LoadBalancerClient::new, req, |mut c, r| async move {
            c.transfer_leadership(r).await
        })
        .await?;
    #[derive(Serialize)]
    struct Moved {
        new_leader: String,
        term: u64,
        time_to_move_vip_seconds: Option<f64>,
    }
    output::print(
        format,
        &Moved {
            new_leader: node_name(r.new_leader.as_ref()),
            term: r.term,
            time_to_move_vip_seconds: seconds(
                r.failover
                    .as_ref()
                    .and_then(|f| f.time_to_move_vip.as_ref()),
            ),
        },
        |m| {
            format!(
                "leadership moved to {} in term {} (VIP moved in {})\n",
                m.new_leader,
                m.term,
                duration_text(m.time_to_move_vip_seconds)
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use bulwark_api::time::duration_to_proto;

    use super::*;

    fn parse(args: &[&str]) -> Result<LbCommand, clap::Error> {
        use clap::Parser as _;
        let cli =
            crate::cli::Cli::try_parse_from(["bulwarkctl", "lb"].iter().chain(args).copied())?;
        match cli.command {
            crate::cli::Command::Lb(c) => Ok(c),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn refusal(args: &[&str]) -> String {
        let e = parse(args).expect_err("refused");
        assert_eq!(e.exit_code(), 2, "{e}");
        e.to_string()
    }

    /// Backend and member flags are refused with the LB's own words before
    /// anything connects (no context file is needed to learn of a typo).
    #[test]
    fn bad_backend_and_member_flags_are_refused_when_parsed() {
        let e = refusal(&["add-backend", "cp-4", "--address", "10.0.0.14"]);
        assert!(
            e.contains("invalid value '10.0.0.14' for '--address <ADDRESS>': not an IP:port an apiserver listens on"),
            "{e}"
        );
        let e = refusal(&["add-backend", "CP_4", "--address", "10.0.0.14:6443"]);
        assert!(
            e.contains("'CP_4' for '<ID>': not a valid backend id: expected a lowercase DNS name"),
            "{e}"
        );
        let e = refusal(&[
            "add-backend",
            "cp-4",
            "--address",
            "10.0.0.14:6443",
            "--weight",
            "0",
        ]);
        assert!(
            e.contains("'0' for '--weight <WEIGHT>': out of range: expected between 1 and 10000"),
            "{e}"
        );
        let e = refusal(&["update-backend", "cp-4", "--weight", "heavy"]);
        assert!(
            e.contains("'heavy' for '--weight <WEIGHT>': not a whole number"),
            "{e}"
        );
        let e = refusal(&["update-backend", "cp-4", "--zone", "zone a"]);
        assert!(
            e.contains("not a zone: at most 63 printable ASCII characters"),
            "{e}"
        );
        let e = refusal(&["update-backend", "cp-4"]);
        assert!(e.contains("--weight <WEIGHT>|--zone <ZONE>"), "{e}");
        let member = [
            "add-member",
            "--raft-address",
            "10.0.0.14:9441",
            "--api-address",
            "10.0.0.14:9442",
        ];
        let e = refusal(&[&member[..], &["--id", "0"]].concat());
        assert!(
            e.contains("'0' for '--id <ID>': not a node id: it must be greater than 0"),
            "{e}"
        );
        let e = refusal(&[&member[..], &["--id", "4", "--proxy-address", "10.0.0.14"]].concat());
        assert!(
            e.contains("'10.0.0.14' for '--proxy-address <PROXY_ADDRESS>': not host:port"),
            "{e}"
        );
    }

    #[test]
    fn good_backend_and_member_flags_become_the_requests_values() {
        let add = parse(&[
            "add-backend",
            "cp-4.example",
            "--address",
            "[fd00::14]:6443",
            "--weight",
            "200",
        ])
        .unwrap();
        assert!(
            matches!(
                add,
                LbCommand::AddBackend { ref id, address, weight: Some(200), ref zone, drained: false }
                    if id == "cp-4.example" && address.to_string() == "[fd00::14]:6443" && zone.is_empty()
            ),
            "{add:?}"
        );
        let update = parse(&["update-backend", "cp-4", "--zone", "zone-b"]).unwrap();
        assert!(
            matches!(
                update,
                LbCommand::UpdateBackend { ref id, weight: None, zone: Some(ref z) } if id == "cp-4" && z == "zone-b"
            ),
            "{update:?}"
        );
        let member = parse(&[
            "add-member",
            "--id",
            "4",
            "--raft-address",
            "lb-4.example:9441",
            "--api-address",
            "10.0.0.14:9442",
        ])
        .unwrap();
        assert!(
            matches!(
                member,
                LbCommand::AddMember { id: 4, ref proxy_address, .. } if proxy_address.is_empty()
            ),
            "{member:?}"
        );
    }

    #[test]
    fn bgp_sessions_are_rendered_per_peer() {
        let b = lb::BgpStatus {
            peers: vec![
                lb::BgpPeer {
                    address: "10.0.0.1:179".into(),
                    asn: 65000,
                    state: lb::BgpSessionState::Established as i32,
                    announced: vec!["10.0.0.10/32".into()],
                    last_error: String::new(),
                    established_since: None,
                    bfd: Some(lb::BfdSession {
                        state: lb::BfdState::Up as i32,
                        remote_state: lb::BfdState::Up as i32,
                        detection_time: Some(prost_types::Duration {
                            seconds: 0,
                            nanos: 300_000_000,
                        }),
                        ..Default::default()
                    }),
                },
                lb::BgpPeer {
                    address: "10.0.1.1:179".into(),
                    asn: 65000,
                    state: lb::BgpSessionState::Idle as i32,
                    announced: vec![],
                    last_error: "BFD session down (control detection time expired)".into(),
                    established_since: None,
                    bfd: Some(lb::BfdSession {
                        state: lb::BfdState::Down as i32,
                        last_change_at: Some(prost_types::Timestamp {
                            seconds: 1_800_000_000,
                            nanos: 0,
                        }),
                        last_change_from: lb::BfdState::Up as i32,
                        last_change_diag: "control detection time expired".into(),
                        downs: 1,
                        ..Default::default()
                    }),
                },
            ],
            last_announce: Some(lb::BgpEvent {
                at: None,
                reason: "leader of term 3 with a fresh quorum lease".into(),
            }),
            last_withdraw: None,
        };
        let text = render_bgp(&BgpView::of(&b));
        assert!(
            text.contains("leader of term 3 with a fresh quorum lease"),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        let up = lines.iter().find(|l| l.contains("10.0.0.1:179")).unwrap();
        assert!(
            up.contains("established") && up.contains("10.0.0.10/32"),
            "{up}"
        );
        let down = lines.iter().find(|l| l.contains("10.0.1.1:179")).unwrap();
        assert!(
            down.contains("idle") && down.contains("BFD session down"),
            "{down}"
        );
        assert!(up.contains("up (detect 300ms)"), "{up}");
        assert!(
            down.contains("down since 2027-01-15T08:00:00Z: control detection time expired"),
            "{down}"
        );
    }

    /// Scripts get numbers: lag and indexes as integers or null (never
    /// "-"), durations as seconds in fields that say so.
    #[test]
    fn json_has_numbers_and_nulls_where_the_table_has_words_and_dashes() {
        let caught_up = lb::Member {
            node: Some(lb::NodeInfo {
                id: 1,
                ..Default::default()
            }),
            role: lb::MemberRole::Voter as i32,
            replication: Some(lb::ReplicationStatus {
                matched_index: Some(41),
                lag_entries: 2,
                last_ack_age: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 503_000_000,
                }),
            }),
            fence_timers: Some(lb::FenceTimers {
                hold: duration_to_proto(Duration::from_micros(186_617)).ok(),
                election_timeout_max: duration_to_proto(Duration::from_millis(220)).ok(),
            }),
        };
        let unknown = lb::Member {
            replication: None,
            fence_timers: None,
            ..caught_up.clone()
        };
        let rows = vec![member_view(&caught_up), member_view(&unknown)];
        let json = output::render(OutputFormat::Json, &rows, |_| String::new()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json[0]["lag"], 2);
        assert_eq!(json[0]["matched_index"], 41);
        assert_eq!(json[0]["last_ack_age_seconds"], 0.503);
        assert!(json[1]["lag"].is_null(), "{json}");
        assert!(json[1]["last_ack_age_seconds"].is_null(), "{json}");
        assert_eq!(json[0]["fence_hold_seconds"], 0.186617);
        assert_eq!(json[0]["election_timeout_max_seconds"], 0.22);
        assert!(json[1]["fence_hold_seconds"].is_null(), "{json}");
        let table = render_members(&rows, Some(1));
        assert!(
            table.contains("41       2    503ms     186ms/220ms"),
            "{table}"
        );
        assert!(table.contains("-        -    -         -"), "{table}");
    }

    #[test]
    fn an_avoided_backend_shows_when_its_last_connect_failed() {
        let avoided = lb::Backend {
            id: "api-a".into(),
            traffic: Some(lb::BackendTraffic {
                connect_errors: 3,
                last_connect_error_at: Some(prost_types::Timestamp {
                    seconds: 1_800_000_000,
                    nanos: 500_000_000,
                }),
                avoided: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let fine = lb::Backend {
            id: "api-b".into(),
            traffic: Some(lb::BackendTraffic::default()),
            ..Default::default()
        };
        let rows = vec![backend_view(&avoided), backend_view(&fine)];
        let json = output::render(OutputFormat::Json, &rows, |_| String::new()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json[0]["avoided"], true);
        assert_eq!(json[0]["last_connect_error_at"], "2027-01-15T08:00:00Z");
        assert_eq!(json[1]["avoided"], false);
        assert!(json[1]["last_connect_error_at"].is_null(), "{json}");
        let table = render_backends(&rows);
        let line = |id: &str| {
            table
                .lines()
                .find(|l| l.starts_with(id))
                .unwrap()
                .to_owned()
        };
        assert!(
            line("api-a").ends_with("3               2027-01-15T08:00:00Z  yes"),
            "{table}"
        );
        assert!(
            line("api-b").ends_with("0               -                     no"),
            "{table}"
        );
    }

    #[test]
    fn a_claim_delay_is_explained_under_the_members() {
        let view = |hold: f64| MemberView {
            id: 1,
            name: String::new(),
            role: "voter".into(),
            raft_address: String::new(),
            api_address: String::new(),
            zone: String::new(),
            matched_index: None,
            lag: None,
            last_ack_age_seconds: None,
            fence_hold_seconds: Some(hold),
            election_timeout_max_seconds: Some(0.22),
        };
        let same = [view(0.1866), view(0.1866)];
        let mixed = [view(0.1866), view(0.4391)];
        assert_eq!(claim_delay_note(&same, Some(0.0)), "");
        assert_eq!(claim_delay_note(&mixed, None), "");
        let note = claim_delay_note(&mixed, Some(0.2235));
        assert!(
            note.starts_with("note: a new leader waits 223ms before it takes the VIP: the members run different fence timers"),
            "{note}"
        );
        let note = claim_delay_note(&same, Some(0.05));
        assert!(note.contains("waits 50ms"), "{note}");
        assert!(note.contains("vip.lease is too long"), "{note}");
    }
}
