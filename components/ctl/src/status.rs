//! `bulwarkctl status`: the whole control plane from one command. It asks
//! bulwark-lb (`GetStatus`, `ListBackends`, and `GetHealth` on the leader)
//! and bulwark-backup (`GetStatus`) and prints one report: the LB leader,
//! the VIP holder and since when, the members, every backend with its
//! verdict and zone, the probers the leader counts, the last backup, the
//! RPO lag and the last restore drill.
//!
//! A part that cannot be fetched does not hide the others: the report says
//! `UNAVAILABLE` in its place (and `"unavailable": "<why>"` in JSON/YAML),
//! and the command exits with the code of the first failure (3 unreachable,
//! 4 refused certificate) after printing everything it could. A service
//! the context names no endpoint for is `not configured`, which is no
//! failure: a context with only LB endpoints can exit 0.

use std::time::SystemTime;

use bulwark_api::backup::v1 as bk;
use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use serde::Serialize;

use crate::connect::{Service, Session};
use crate::error::{CliError, Exit};
use crate::output::{self, OutputFormat, duration_text, enum_name, seconds, size};

/// One part of the report: what was fetched, or why it could not be.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Part<T> {
    /// Fetched.
    Ok(T),
    /// Not asked: the context and flags name no endpoint for it.
    NotConfigured {
        /// How to configure it.
        not_configured: String,
    },
    /// Not fetched.
    Unavailable {
        /// The error, naming the service and endpoint.
        unavailable: String,
        /// What to do about it.
        #[serde(skip_serializing_if = "Option::is_none")]
        hint: Option<String>,
    },
}

impl<T> Part<T> {
    fn from_result(r: Result<T, CliError>, failures: &mut Vec<CliError>) -> Self {
        match r {
            Ok(v) => Part::Ok(v),
            Err(e) => {
                let part = Part::Unavailable {
                    unavailable: e.to_string(),
                    hint: e.hint_text().map(str::to_owned),
                };
                failures.push(e);
                part
            }
        }
    }
}

/// A part for a service no endpoint is configured for.
fn not_configured<T>(service: &str, flag: &str) -> Part<T> {
    Part::NotConfigured {
        not_configured: format!(
            "no {service} endpoint; pass --{flag}-endpoint HOST:PORT or add `{flag}.endpoints` to the context"
        ),
    }
}

/// The report.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// True when every configured part was fetched.
    pub complete: bool,
    /// The LB cluster.
    pub lb: Part<LbView>,
    /// Health aggregation on the LB leader (probers).
    pub probers: Part<Vec<ProberRow>>,
    /// Backups.
    pub backup: Part<BackupView>,
}

/// The LB cluster as one node sees it.
#[derive(Debug, Serialize)]
pub struct LbView {
    /// The node that answered (`id (name)`).
    pub answered_by: String,
    /// The leader (`id (name)`); `None` during an election.
    pub leader: Option<String>,
    /// Raft term.
    pub term: u64,
    /// The VIP.
    pub vip: VipView,
    /// Health aggregation failed open (every backend routed to).
    pub fail_open: bool,
    /// Zones with no backend up.
    pub zones_down: Vec<String>,
    /// Raft members.
    pub members: Vec<MemberRow>,
    /// Backends that receive new connections now.
    pub backends_routable: u32,
    /// Registered backends.
    pub backends_total: u32,
    /// Every backend.
    pub backends: Vec<BackendRow>,
    /// The newest leadership change.
    pub last_failover: Option<FailoverRow>,
}

/// The virtual IP.
#[derive(Debug, Serialize)]
pub struct VipView {
    /// Address, or `disabled`.
    pub address: String,
    /// `arp`, `bind` or `disabled`.
    pub mode: String,
    /// Holder node id; `None` while nobody holds it.
    pub holder: Option<u64>,
    /// Holder's name when it is a member.
    pub holder_name: Option<String>,
    /// When the holder took it (RFC 3339).
    pub held_since: Option<String>,
    /// For how long, in seconds, by the answering node's clock.
    pub held_for_seconds: Option<f64>,
    /// How long a new leader would wait before taking it, in seconds
    /// (nonzero when the members' fence timers differ).
    pub claim_delay_seconds: Option<f64>,
}

/// One Raft member.
#[derive(Debug, Serialize)]
pub struct MemberRow {
    /// Raft node id.
    pub id: u64,
    /// Host name.
    pub name: String,
    /// `voter` or `learner`.
    pub role: String,
    /// True for the leader.
    pub leader: bool,
    /// Zone.
    pub zone: String,
    /// API address.
    pub api_address: String,
    /// Entries behind the leader (known when the leader answered).
    pub lag: Option<u64>,
}

/// One backend.
#[derive(Debug, Serialize)]
pub struct BackendRow {
    /// Backend id.
    pub id: String,
    /// host:port.
    pub address: String,
    /// Zone.
    pub zone: String,
    /// `active` or `drain`.
    pub admin: String,
    /// `up`, `not_ready`, `down` or `unknown`.
    pub verdict: String,
    /// Why, in one line.
    pub reason: String,
    /// When the verdict last changed (RFC 3339).
    pub since: Option<String>,
    /// Receives new connections now.
    pub routable: bool,
}

/// One prober as the LB leader counts it.
#[derive(Debug, Serialize)]
pub struct ProberRow {
    /// Its node name.
    pub node: String,
    /// Its zone.
    pub zone: String,
    /// `counted`, `isolated` or `stale`.
    pub state: String,
    /// Seconds since its last report.
    pub last_report_age_seconds: Option<f64>,
}

/// A leadership change.
#[derive(Debug, Serialize)]
pub struct FailoverRow {
    /// When (RFC 3339).
    pub at: String,
    /// Previous leader.
    pub from: Option<u64>,
    /// New leader.
    pub to: u64,
    /// Why.
    pub cause: String,
    /// Detection plus election, in seconds.
    pub time_to_detect_seconds: Option<f64>,
    /// Election won to VIP announced, in seconds.
    pub time_to_move_vip_seconds: Option<f64>,
}

/// Backups.
#[derive(Debug, Serialize)]
pub struct BackupView {
    /// The instance that answered.
    pub answered_by: String,
    /// The instance leading scheduled work.
    pub schedule_leader: String,
    /// Where backups go.
    pub store: String,
    /// `every 1h`, or `cron or on demand`.
    pub schedule: String,
    /// The schedule's interval in seconds; `None` for cron or on demand.
    pub schedule_interval_seconds: Option<f64>,
    /// Next scheduled snapshot (RFC 3339).
    pub next_run: Option<String>,
    /// The newest committed snapshot.
    pub last_backup: Option<LastBackup>,
    /// Newest revision a restore can reach.
    pub newest_revision_covered: i64,
    /// The current timeline (every restore starts a new one).
    pub timeline: u32,
    /// Continuous deltas: `running`, `lagging`, `gap`, `disabled`, `stopped`.
    pub deltas: String,
    /// RPO lag in seconds: recent history lost if etcd were lost now.
    pub rpo_lag_seconds: Option<f64>,
    /// The last restore drill.
    pub last_drill: Option<DrillRow>,
    /// The last verification without a drill (hashes only), kept apart so
    /// a plain check of an old snapshot neither fails nor refreshes the
    /// drill.
    pub last_verify: Option<DrillRow>,
    /// The last error of scheduled work.
    pub last_error: Option<String>,
    /// A restore running now.
    pub restore_in_progress: Option<String>,
}

/// The newest snapshot.
#[derive(Debug, Serialize)]
pub struct LastBackup {
    /// Snapshot id.
    pub id: String,
    /// When committed (RFC 3339).
    pub at: String,
    /// How long ago, in seconds, by this machine's clock.
    pub age_seconds: Option<f64>,
    /// etcd revision.
    pub revision: i64,
    /// Stored size in bytes.
    pub stored_bytes: u64,
    /// Encrypted client-side.
    pub encrypted: bool,
    /// `passed`, `FAILED` or `never`, with the time.
    pub verified: String,
}

/// A restore drill or a verification.
#[derive(Debug, Serialize)]
pub struct DrillRow {
    /// The checked snapshot.
    pub snapshot: String,
    /// Every check passed.
    pub passed: bool,
    /// When it finished (RFC 3339).
    pub at: String,
    /// How long it took, in seconds.
    pub took_seconds: Option<f64>,
}

/// An optional number of seconds for people (`-` when unknown).
fn secs_text(s: Option<f64>) -> Option<String> {
    s.map(|s| duration_text(Some(s)))
}

fn time_of(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    bulwark_api::time::timestamp_from_proto(t?).ok()
}

fn ts(t: Option<&prost_types::Timestamp>) -> Option<String> {
    time_of(t).map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

/// `later - earlier` in whole seconds, when both are known and ordered.
fn between(earlier: Option<SystemTime>, later: Option<SystemTime>) -> Option<f64> {
    let d = later?.duration_since(earlier?).ok()?;
    Some(d.as_secs() as f64)
}

/// An enum value's proto name without its prefix, lowercased.
fn node_ref(n: &lb::NodeInfo) -> String {
    if n.name.is_empty() {
        n.id.to_string()
    } else {
        format!("{} ({})", n.id, n.name)
    }
}

/// The LB node's status with only the newest failover: the overview
/// names the last one.
async fn get_status(svc: &Service<'_>) -> Result<lb::GetStatusResponse, CliError> {
    crate::lb::get_status(svc, 1).await
}

async fn lb_part(svc: &Service<'_>) -> Result<LbView, CliError> {
    let mut s = get_status(svc).await?;
    // Only the leader knows how far each member lags: ask it when a
    // follower answered. If the leader cannot be reached from here, the
    // follower's answer stands (without lag).
    if s.role != lb::NodeRole::Leader as i32
        && let Some(leader) = s.leader.as_ref().filter(|l| !l.api_address.is_empty())
        && let Ok(from_leader) = get_status(&svc.preferring(&leader.api_address)).await
        && from_leader.role == lb::NodeRole::Leader as i32
    {
        s = from_leader;
    }
    let list = svc
        .send(
            LoadBalancerClient::new,
            lb::ListBackendsRequest::default(),
            |mut c, r| async move { c.list_backends(r).await },
        )
        .await?;
    Ok(lb_view(&s, &list))
}

fn lb_view(s: &lb::GetStatusResponse, list: &lb::ListBackendsResponse) -> LbView {
    let leader_id = s.leader.as_ref().map(|l| l.id);
    let vip = s.vip.clone().unwrap_or_default();
    let mode = enum_name(vip.mode, lb::VipMode::as_str_name, "VIP_MODE_");
    let holder_name = vip.holder_node_id.and_then(|h| {
        s.members
            .iter()
            .filter_map(|m| m.node.as_ref())
            .find(|n| n.id == h && !n.name.is_empty())
            .map(|n| n.name.clone())
    });
    LbView {
        answered_by: s.node.as_ref().map(node_ref).unwrap_or_default(),
        leader: s.leader.as_ref().map(node_ref),
        term: s.current_term,
        vip: VipView {
            address: if vip.address.is_empty() {
                "disabled".into()
            } else {
                vip.address.clone()
            },
            // The config's names: `arp` is the proto's L2.
            mode: match mode.as_str() {
                "unspecified" => "disabled".into(),
                "l2" => "arp".into(),
                _ => mode,
            },
            holder: vip.holder_node_id,
            holder_name,
            held_since: ts(vip.held_since.as_ref()),
            held_for_seconds: between(
                time_of(vip.held_since.as_ref()),
                time_of(s.observed_at.as_ref()),
            ),
            claim_delay_seconds: output::seconds(vip.claim_delay.as_ref()),
        },
        fail_open: s.fail_open,
        zones_down: s.zones_down.clone(),
        members: s
            .members
            .iter()
            .map(|m| {
                let n = m.node.clone().unwrap_or_default();
                MemberRow {
                    leader: Some(n.id) == leader_id,
                    id: n.id,
                    name: n.name,
                    role: enum_name(m.role, lb::MemberRole::as_str_name, "MEMBER_ROLE_"),
                    zone: n.zone,
                    api_address: n.api_address,
                    lag: m.replication.map(|r| r.lag_entries),
                }
            })
            .collect(),
        backends_routable: s.backends_routable,
        backends_total: s.backends_total,
        backends: list
            .backends
            .iter()
            .map(|b| {
                let v = b.verdict.clone().unwrap_or_default();
                BackendRow {
                    id: b.id.clone(),
                    address: b.address.clone(),
                    zone: b.zone.clone(),
                    admin: enum_name(b.admin_state, lb::AdminState::as_str_name, "ADMIN_STATE_"),
                    verdict: enum_name(v.verdict, lb::Verdict::as_str_name, "VERDICT_"),
                    reason: v.reason,
                    since: ts(v.since.as_ref()),
                    routable: b.routable,
                }
            })
            .collect(),
        last_failover: s.recent_failovers.first().map(|f| FailoverRow {
            at: ts(f.at.as_ref()).unwrap_or_default(),
            from: f.from_node_id,
            to: f.to_node_id,
            cause: enum_name(f.cause, lb::FailoverCause::as_str_name, "FAILOVER_CAUSE_"),
            time_to_detect_seconds: seconds(f.time_to_detect.as_ref()),
            time_to_move_vip_seconds: seconds(f.time_to_move_vip.as_ref()),
        }),
    }
}

/// Probers come from the leader's aggregation (a follower redirects).
async fn probers_part(svc: &Service<'_>) -> Result<Vec<ProberRow>, CliError> {
    let h = svc
        .send(
            LoadBalancerClient::new,
            lb::GetHealthRequest::default(),
            |mut c, r| async move { c.get_health(r).await },
        )
        .await?;
    Ok(h.probers
        .iter()
        .map(|p| ProberRow {
            node: p.node_name.clone(),
            zone: p.zone.clone(),
            state: if p.isolated {
                "isolated"
            } else if p.stale {
                "stale"
            } else {
                "counted"
            }
            .into(),
            last_report_age_seconds: seconds(p.last_report_age.as_ref()),
        })
        .collect())
}

async fn backup_part(svc: &Service<'_>, now: SystemTime) -> Result<BackupView, CliError> {
    let s = crate::backup::get_status(svc).await?;
    Ok(backup_view(&s, now))
}

fn backup_view(s: &bk::GetStatusResponse, now: SystemTime) -> BackupView {
    let sched = s.schedule.clone().unwrap_or_default();
    let deltas = s.deltas.unwrap_or_default();
    BackupView {
        answered_by: s.node_name.clone(),
        schedule_leader: sched.leader.clone(),
        store: s.store_url.clone(),
        schedule: secs_text(seconds(sched.interval.as_ref()))
            .map(|d| format!("every {d}"))
            .unwrap_or_else(|| "cron or on demand".into()),
        schedule_interval_seconds: seconds(sched.interval.as_ref()),
        next_run: ts(sched.next_run_at.as_ref()),
        last_backup: s.last_success.as_ref().map(|l| LastBackup {
            id: l.id.clone(),
            at: ts(l.created_at.as_ref()).unwrap_or_default(),
            age_seconds: between(time_of(l.created_at.as_ref()), Some(now)),
            revision: l.revision,
            stored_bytes: l.stored_size_bytes,
            encrypted: l.encrypted,
            verified: match &l.last_verification {
                None => "never".into(),
                Some(v) => format!(
                    "{} {}",
                    if v.passed { "passed" } else { "FAILED" },
                    ts(v.verified_at.as_ref()).unwrap_or_default()
                ),
            },
        }),
        newest_revision_covered: s.newest_revision_covered,
        timeline: s.timeline,
        deltas: match bk::DeltaState::try_from(deltas.state) {
            Ok(bk::DeltaState::Unspecified) | Err(_) => "unknown".into(),
            Ok(st) => st
                .as_str_name()
                .trim_start_matches("DELTA_STATE_")
                .to_lowercase(),
        },
        rpo_lag_seconds: seconds(deltas.rpo_lag.as_ref()),
        last_drill: s.last_drill.as_ref().map(check_row),
        last_verify: s.last_verify.as_ref().map(check_row),
        last_error: s.last_error.as_ref().map(|e| {
            format!(
                "{} ({}): {}",
                ts(e.at.as_ref()).unwrap_or_default(),
                e.operation,
                e.message
            )
        }),
        restore_in_progress: s.restore_in_progress.as_ref().map(|r| {
            format!(
                "{} by {} since {}, phase {}",
                r.restore_id,
                r.coordinator,
                ts(r.started_at.as_ref()).unwrap_or_default(),
                enum_name(r.phase, bk::RestorePhase::as_str_name, "RESTORE_PHASE_")
            )
        }),
    }
}

/// Fetches every configured part; the failures come back beside the
/// report. A service without endpoints is reported as not configured, not
/// as a failure: a context may name only the LB, or only backups.
pub async fn gather(session: &Session) -> (StatusReport, Vec<CliError>) {
    // The questions go out at once: a dead endpoint costs its connect
    // timeout once, not once per part.
    let lb_calls = async {
        let svc = session.lb().ok()?;
        Some(tokio::join!(lb_part(&svc), probers_part(&svc)))
    };
    let backup_call = async {
        let svc = session.backup().ok()?;
        Some(backup_part(&svc, SystemTime::now()).await)
    };
    let (lb_calls, backup) = tokio::join!(lb_calls, backup_call);

    let mut failures = Vec::new();
    let (lb, probers) = match lb_calls {
        Some((lb, probers)) => {
            let lb = Part::from_result(lb, &mut failures);
            let probers = match (&lb, probers) {
                // When the LB is unreachable the probers are too: count
                // that failure once.
                (Part::Unavailable { .. }, Err(e)) => Part::Unavailable {
                    unavailable: e.to_string(),
                    hint: None,
                },
                (_, r) => Part::from_result(r, &mut failures),
            };
            (lb, probers)
        }
        None => (
            not_configured("bulwark-lb", "lb"),
            not_configured("bulwark-lb", "lb"),
        ),
    };
    let backup = match backup {
        Some(r) => Part::from_result(r, &mut failures),
        None => not_configured("bulwark-backup", "backup"),
    };
    (
        StatusReport {
            complete: failures.is_empty(),
            lb,
            probers,
            backup,
        },
        failures,
    )
}

/// Runs `bulwarkctl status`.
pub async fn run(session: &Session, format: OutputFormat) -> Result<(), CliError> {
    if session.lb().is_err() && session.backup().is_err() {
        return Err(CliError::new(
            Exit::Usage,
            "no bulwark-lb or bulwark-backup endpoint configured: nothing to ask",
        )
        .hint("pass --lb-endpoint and/or --backup-endpoint HOST:PORT, or add `lb.endpoints`/`backup.endpoints` to the context"));
    }
    let (report, mut failures) = gather(session).await;
    output::print(format, &report, render)?;
    if failures.is_empty() {
        return Ok(());
    }
    let first = failures.remove(0);
    let what: Vec<&str> = [
        matches!(report.lb, Part::Unavailable { .. }).then_some("lb"),
        matches!(report.probers, Part::Unavailable { .. }).then_some("probers"),
        matches!(report.backup, Part::Unavailable { .. }).then_some("backup"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let err = CliError::new(
        first.exit(),
        format!(
            "status is incomplete ({} unavailable): {first}",
            what.join(", ")
        ),
    );
    Err(match first.hint_text() {
        Some(h) => err.hint(h),
        None => err,
    })
}

fn unavailable(out: &mut String, unavailable: &str, hint: &Option<String>) {
    out.push_str(&format!("UNAVAILABLE: {unavailable}\n"));
    if let Some(h) = hint {
        out.push_str(&format!("hint: {h}\n"));
    }
}

fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

/// The table view: each part of the report in turn (LB with its VIP,
/// members and backends; probers; backups).
pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    render_part(&mut out, "LOAD BALANCER ", &r.lb, render_lb);
    out.push('\n');
    render_part(&mut out, "PROBERS ", &r.probers, |o, p| {
        render_probers(o, p)
    });
    out.push('\n');
    render_part(&mut out, "BACKUP ", &r.backup, render_backup);
    out
}

/// One part: rendered by `ok` when fetched, `TITLE UNAVAILABLE: why` when not.
fn render_part<T>(out: &mut String, title: &str, part: &Part<T>, ok: impl FnOnce(&mut String, &T)) {
    match part {
        Part::Ok(v) => ok(out, v),
        Part::NotConfigured { not_configured } => {
            out.push_str(&format!("{title}not configured: {not_configured}\n"));
        }
        Part::Unavailable {
            unavailable: u,
            hint,
        } => {
            out.push_str(title);
            unavailable(out, u, hint);
        }
    }
}

/// The LB part: its summary fields, then the members and the backends.
fn render_lb(out: &mut String, l: &LbView) {
    out.push_str(&format!(
        "LOAD BALANCER, answered by node {}\n",
        l.answered_by
    ));
    let mut pairs = vec![
        (
            "leader",
            match &l.leader {
                Some(n) => format!("{n}, term {}", l.term),
                None => format!("NONE (election in progress), term {}", l.term),
            },
        ),
        ("vip", vip_text(&l.vip)),
        (
            "backends",
            format!("{}/{} routable", l.backends_routable, l.backends_total),
        ),
        (
            "zones down",
            if l.zones_down.is_empty() {
                "none".into()
            } else {
                l.zones_down.join(", ")
            },
        ),
    ];
    if l.fail_open {
        pairs.push((
            "FAIL-OPEN",
            "every backend looks down to the probers; routing to all".into(),
        ));
    }
    if let Some(delay) = l.vip.claim_delay_seconds.filter(|d| *d > 0.0) {
        pairs.push((
            "claim delay",
            format!(
                "a new leader waits {} before it takes the VIP (the members' fence timers: \
                 bulwarkctl lb members)",
                output::duration_text(Some(delay))
            ),
        ));
    }
    if let Some(f) = &l.last_failover {
        pairs.push(("last failover", failover_text(f)));
    }
    out.push_str(&output::fields(&pairs));
    out.push('\n');
    out.push_str(&members_table(&l.members));
    out.push('\n');
    out.push_str(&backends_table(&l.backends));
}

/// The VIP line: address and mode, who holds it and since when.
fn vip_text(vip: &VipView) -> String {
    if vip.mode == "disabled" {
        return "disabled".to_owned();
    }
    let held = match (vip.holder, &vip.holder_name) {
        (None, _) => "held by nobody".to_owned(),
        (Some(h), name) => format!(
            "held by {h}{} since {}{}",
            name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default(),
            opt(&vip.held_since),
            secs_text(vip.held_for_seconds)
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ),
    };
    format!("{} ({}), {held}", vip.address, vip.mode)
}

/// The last failover: when, from whom to whom, why and how fast.
fn failover_text(f: &FailoverRow) -> String {
    let moved = match f.from {
        Some(from) => format!("node {from} -> node {}", f.to),
        None => format!("node {}", f.to),
    };
    let detect = secs_text(f.time_to_detect_seconds)
        .map(|d| format!(", detected in {d}"))
        .unwrap_or_default();
    format!(
        "{} {moved} ({}){detect}, VIP moved in {}",
        f.at,
        f.cause,
        duration_text(f.time_to_move_vip_seconds)
    )
}

/// The Raft members, the leader starred.
fn members_table(members: &[MemberRow]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                format!("{}{}", if m.leader { "*" } else { "" }, m.id),
                m.name.clone(),
                m.role.clone(),
                m.zone.clone(),
                m.api_address.clone(),
                m.lag.map_or_else(|| "-".into(), |l| l.to_string()),
            ]
        })
        .collect();
    output::table(&["MEMBER", "NAME", "ROLE", "ZONE", "API", "LAG"], &rows)
}

/// The registered backends with their verdicts.
fn backends_table(backends: &[BackendRow]) -> String {
    if backends.is_empty() {
        return "BACKEND: none registered (bulwarkctl lb add-backend)\n".into();
    }
    let rows: Vec<Vec<String>> = backends
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.address.clone(),
                b.zone.clone(),
                b.verdict.clone(),
                b.admin.clone(),
                if b.routable { "yes" } else { "NO" }.into(),
                opt(&b.since),
                b.reason.clone(),
            ]
        })
        .collect();
    output::table(
        &[
            "BACKEND", "ADDRESS", "ZONE", "VERDICT", "ADMIN", "ROUTABLE", "SINCE", "REASON",
        ],
        &rows,
    )
}

/// The probers the leader counts.
fn render_probers(out: &mut String, probers: &[ProberRow]) {
    if probers.is_empty() {
        out.push_str("PROBER: none reporting to the leader\n");
        return;
    }
    let rows: Vec<Vec<String>> = probers
        .iter()
        .map(|p| {
            vec![
                p.node.clone(),
                p.zone.clone(),
                p.state.clone(),
                duration_text(p.last_report_age_seconds),
            ]
        })
        .collect();
    out.push_str(&output::table(
        &["PROBER", "ZONE", "STATE", "LAST-REPORT"],
        &rows,
    ));
}

/// The backup part: store, schedule, last backup, RPO, drill, restore.
fn render_backup(out: &mut String, b: &BackupView) {
    out.push_str(&format!(
        "BACKUP (answered by {}; schedule led by {})\n",
        b.answered_by,
        if b.schedule_leader.is_empty() {
            "nobody known"
        } else {
            &b.schedule_leader
        }
    ));
    out.push_str(&output::fields(&[
        ("store", b.store.clone()),
        (
            "schedule",
            match &b.next_run {
                Some(n) => format!("{}, next {n}", b.schedule),
                None => b.schedule.clone(),
            },
        ),
        ("last backup", last_backup_text(b.last_backup.as_ref())),
        (
            "covered to",
            format!(
                "revision {} (timeline {})",
                b.newest_revision_covered, b.timeline
            ),
        ),
        (
            "rpo lag",
            match (secs_text(b.rpo_lag_seconds), b.deltas.as_str()) {
                (_, "disabled") => {
                    "n/a: continuous deltas are off, a restore reaches the last backup".into()
                }
                (Some(lag), state) => format!("{lag} (deltas {state})"),
                (None, state) => format!("unknown (deltas {state})"),
            },
        ),
        ("last drill", check_text(b.last_drill.as_ref())),
        ("last verify", check_text(b.last_verify.as_ref())),
        ("last error", opt(&b.last_error)),
        (
            "restore",
            b.restore_in_progress
                .clone()
                .unwrap_or_else(|| "none running".into()),
        ),
    ]));
}

/// A drill or verification result, as the API sends it.
fn check_row(d: &bk::VerifyResult) -> DrillRow {
    DrillRow {
        snapshot: d.snapshot_id.clone(),
        passed: d.passed,
        at: ts(d.finished_at.as_ref()).unwrap_or_default(),
        took_seconds: seconds(d.took.as_ref()),
    }
}

/// One drill or verification line: snapshot, outcome, when, how long.
fn check_text(d: Option<&DrillRow>) -> String {
    match d {
        None => "never".into(),
        Some(d) => format!(
            "{} {} at {} (took {})",
            d.snapshot,
            if d.passed { "passed" } else { "FAILED" },
            d.at,
            duration_text(d.took_seconds)
        ),
    }
}

/// The last backup: id, when, how old, revision, size, verification.
fn last_backup_text(l: Option<&LastBackup>) -> String {
    let Some(l) = l else {
        return "NONE".into();
    };
    format!(
        "{} at {}{} (revision {}, {} stored{}), verified {}",
        l.id,
        l.at,
        secs_text(l.age_seconds)
            .map(|a| format!(", {a} ago"))
            .unwrap_or_default(),
        l.revision,
        size(l.stored_bytes),
        if l.encrypted { ", encrypted" } else { "" },
        l.verified
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ts_at(secs: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        })
    }

    fn node(id: u64, name: &str) -> lb::NodeInfo {
        lb::NodeInfo {
            id,
            name: name.into(),
            api_address: format!("10.0.0.1{id}:9442"),
            zone: format!("zone-{id}"),
            ..Default::default()
        }
    }

    #[test]
    fn lb_view_names_the_holder_and_how_long_it_held() {
        let s = lb::GetStatusResponse {
            node: Some(node(2, "cp-2")),
            role: lb::NodeRole::Follower as i32,
            leader: Some(node(1, "cp-1")),
            current_term: 4,
            members: vec![
                lb::Member {
                    node: Some(node(1, "cp-1")),
                    role: lb::MemberRole::Voter as i32,
                    replication: None,
                    fence_timers: None,
                },
                lb::Member {
                    node: Some(node(2, "cp-2")),
                    role: lb::MemberRole::Learner as i32,
                    replication: None,
                    fence_timers: None,
                },
            ],
            vip: Some(lb::VipStatus {
                address: "10.0.0.10".into(),
                mode: lb::VipMode::L2 as i32,
                holder_node_id: Some(1),
                held_since: ts_at(1_000),
                claim_delay: bulwark_api::time::duration_to_proto(Duration::from_micros(223_533))
                    .ok(),
                ..Default::default()
            }),
            observed_at: ts_at(1_000 + 3 * 3600 + 62),
            backends_total: 1,
            ..Default::default()
        };
        let list = lb::ListBackendsResponse {
            backends: vec![lb::Backend {
                id: "cp-1".into(),
                address: "10.0.0.11:6443".into(),
                zone: "zone-a".into(),
                admin_state: lb::AdminState::Drain as i32,
                verdict: Some(lb::VerdictStatus {
                    verdict: lb::Verdict::NotReady as i32,
                    reason: "readyz failing while alive in 2/3 zones".into(),
                    since: ts_at(2_000),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = lb_view(&s, &list);
        assert_eq!(v.leader.as_deref(), Some("1 (cp-1)"));
        assert_eq!(v.vip.mode, "arp");
        assert_eq!(v.vip.holder_name.as_deref(), Some("cp-1"));
        assert_eq!(v.vip.held_for_seconds, Some(10_862.0));
        assert_eq!(v.members[0].role, "voter");
        assert!(v.members[0].leader && !v.members[1].leader);
        assert_eq!(v.backends[0].verdict, "not_ready");
        assert_eq!(v.backends[0].admin, "drain");
        let report = StatusReport {
            complete: false,
            lb: Part::Ok(v),
            probers: Part::Ok(Vec::new()),
            backup: Part::Unavailable {
                unavailable: "bulwark-backup at h:1: connection refused".into(),
                hint: Some("check that bulwark-backup runs".into()),
            },
        };
        let text = render(&report);
        assert!(
            text.contains("held by 1 (cp-1) since 1970-01-01T00:16:40Z (3h 1m 2s)"),
            "{text}"
        );
        assert!(text.contains("*1 "), "{text}");
        assert!(text.contains("claim delay:"), "{text}");
        assert!(
            text.contains("a new leader waits 223ms before it takes the VIP"),
            "{text}"
        );
        assert!(text.contains("not_ready"), "{text}");
        assert!(
            text.contains(
                "BACKUP UNAVAILABLE: bulwark-backup at h:1: connection refused\nhint: check"
            ),
            "{text}"
        );
        let json = output::render(OutputFormat::Json, &report, render).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json["complete"], false);
        assert_eq!(
            json["backup"]["unavailable"],
            "bulwark-backup at h:1: connection refused"
        );
        assert_eq!(json["lb"]["vip"]["holder"], 1);
        // Durations are numbers of seconds for scripts.
        assert_eq!(json["lb"]["vip"]["held_for_seconds"], 10_862.0);
    }

    #[test]
    fn backup_view_reports_age_rpo_and_drill() {
        let s = bk::GetStatusResponse {
            node_name: "cp-2".into(),
            store_url: "s3://b/p".into(),
            schedule: Some(bk::ScheduleStatus {
                interval: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                leader: "cp-1".into(),
                ..Default::default()
            }),
            last_success: Some(bk::SnapshotSummary {
                id: "snap-1".into(),
                created_at: ts_at(10_000),
                revision: 42,
                ..Default::default()
            }),
            deltas: Some(bk::DeltaStatus {
                state: bk::DeltaState::Running as i32,
                rpo_lag: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 420_000_000,
                }),
                ..Default::default()
            }),
            last_drill: Some(bk::VerifyResult {
                snapshot_id: "snap-1".into(),
                passed: false,
                finished_at: ts_at(10_100),
                ..Default::default()
            }),
            last_verify: Some(bk::VerifyResult {
                snapshot_id: "snap-0".into(),
                passed: true,
                finished_at: ts_at(10_050),
                ..Default::default()
            }),
            ..Default::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000 + 90);
        let v = backup_view(&s, now);
        assert_eq!(v.schedule, "every 1h");
        assert_eq!(v.deltas, "running");
        assert_eq!(v.rpo_lag_seconds, Some(0.42));
        let last = v.last_backup.as_ref().unwrap();
        assert_eq!(last.age_seconds, Some(90.0));
        assert_eq!(last.verified, "never");
        assert!(!v.last_drill.as_ref().unwrap().passed);
        let report = StatusReport {
            complete: true,
            lb: Part::Unavailable {
                unavailable: "x".into(),
                hint: None,
            },
            probers: Part::Unavailable {
                unavailable: "x".into(),
                hint: None,
            },
            backup: Part::Ok(v),
        };
        let text = render(&report);
        assert!(
            text.contains("rpo lag:     420ms (deltas running)"),
            "{text}"
        );
        assert!(text.contains("last drill:  snap-1 FAILED at"), "{text}");
        // A plain verification is its own line: it neither fails nor
        // refreshes the drill.
        assert!(text.contains("last verify: snap-0 passed at"), "{text}");
        let json = output::render(OutputFormat::Json, &report, render).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json["backup"]["rpo_lag_seconds"], 0.42, "{json}");
        assert_eq!(
            json["backup"]["schedule_interval_seconds"], 3600.0,
            "{json}"
        );
        assert_eq!(json["backup"]["last_backup"]["age_seconds"], 90.0, "{json}");
        assert_eq!(
            json["backup"]["last_verify"]["snapshot"], "snap-0",
            "{json}"
        );
    }

    /// Only backup endpoints (here one nobody listens on): the LB part is
    /// "not configured", which is not a failure; only the backup counts.
    #[tokio::test]
    async fn a_service_without_endpoints_is_not_configured_and_no_failure() {
        let pki = bulwark_testkit::Pki::new().unwrap();
        let viewer = pki.client("viewer", &[]).unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let session = Session::open(crate::context::Resolved {
            context: None,
            tls: viewer.tls_files(),
            lb: None,
            backup: Some(crate::context::ServiceEndpoints {
                endpoints: vec![closed],
                server_name: None,
            }),
            timeout: Duration::from_secs(3),
        })
        .unwrap();
        let (report, failures) = gather(&session).await;
        assert!(
            matches!(report.lb, Part::NotConfigured { .. }),
            "{report:?}"
        );
        assert!(
            matches!(report.probers, Part::NotConfigured { .. }),
            "{report:?}"
        );
        assert!(
            matches!(report.backup, Part::Unavailable { .. }),
            "{report:?}"
        );
        assert_eq!(failures.len(), 1, "{failures:?}");
        let text = render(&report);
        assert!(
            text.contains(
                "LOAD BALANCER not configured: no bulwark-lb endpoint; pass --lb-endpoint"
            ),
            "{text}"
        );
        let json = output::render(OutputFormat::Json, &report, render).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(json["lb"]["not_configured"].is_string(), "{json}");
    }
}
