//! `bulwarkctl health`: what the LB leader's health aggregation sees — per
//! backend the committed verdict, the votes per zone and every prober's
//! latest probes (reason and latency); per prober its zone and whether it
//! counts; zones down and the fail-open alert. GetHealth is answered by the
//! leader; a follower's hint is followed (see [`crate::connect`]).

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use clap::Args;
use serde::Serialize;

use crate::connect::Service;
use crate::error::CliError;
use crate::output::{self, OutputFormat, duration_text, enum_name, seconds};

/// `bulwarkctl health`
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Only this backend.
    #[arg(long)]
    pub backend: Option<String>,
}

#[derive(Debug, Serialize)]
struct HealthView {
    fail_open: bool,
    zones_down: Vec<String>,
    backends: Vec<BackendView>,
    probers: Vec<ProberView>,
}

#[derive(Debug, Serialize)]
struct BackendView {
    id: String,
    address: String,
    zone: String,
    verdict: String,
    reason: String,
    since: Option<String>,
    zones: Vec<ZoneView>,
    probes: Vec<ProbeView>,
}

#[derive(Debug, Serialize)]
struct ZoneView {
    zone: String,
    verdict: String,
    up: u32,
    not_ready: u32,
    down: u32,
    ignored: u32,
}

#[derive(Debug, Serialize)]
struct ProbeView {
    prober: String,
    zone: String,
    counted: bool,
    /// Latest result per kind, e.g. `readyz: ok 2ms`.
    latest: Vec<ObservationView>,
}

#[derive(Debug, Serialize)]
struct ObservationView {
    kind: String,
    ok: bool,
    reason: String,
    http_status: Option<u32>,
    latency_seconds: Option<f64>,
    detail: String,
}

#[derive(Debug, Serialize)]
struct ProberView {
    node_name: String,
    zone: String,
    state: String,
    last_report_age_seconds: Option<f64>,
    last_sequence: u64,
}

fn timestamp(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.and_then(|t| bulwark_api::time::timestamp_from_proto(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn view(r: lb::GetHealthResponse) -> HealthView {
    let backends = r
        .backends
        .into_iter()
        .map(|b| {
            let v = b.verdict.unwrap_or_default();
            BackendView {
                verdict: enum_name(v.verdict, lb::Verdict::as_str_name, "VERDICT_"),
                reason: v.reason,
                since: timestamp(v.since.as_ref()),
                zones: b
                    .zones
                    .into_iter()
                    .map(|z| ZoneView {
                        verdict: enum_name(z.zone_verdict, lb::Verdict::as_str_name, "VERDICT_"),
                        zone: z.zone,
                        up: z.up,
                        not_ready: z.not_ready,
                        down: z.down,
                        ignored: z.ignored,
                    })
                    .collect(),
                probes: b
                    .probers
                    .into_iter()
                    .map(|p| ProbeView {
                        prober: p.prober,
                        zone: p.zone,
                        counted: p.counted,
                        latest: p
                            .latest
                            .into_iter()
                            .map(|o| ObservationView {
                                kind: enum_name(o.kind, lb::ProbeKind::as_str_name, "PROBE_KIND_"),
                                ok: o.ok,
                                reason: enum_name(
                                    o.reason,
                                    lb::ProbeReason::as_str_name,
                                    "PROBE_REASON_",
                                ),
                                http_status: o.http_status,
                                latency_seconds: seconds(o.latency.as_ref()),
                                detail: o.detail,
                            })
                            .collect(),
                    })
                    .collect(),
                id: b.backend_id,
                address: b.address,
                zone: b.zone,
            }
        })
        .collect();
    let probers = r
        .probers
        .into_iter()
        .map(|p| ProberView {
            state: match (p.isolated, p.stale) {
                (true, _) => "isolated".into(),
                (_, true) => "stale".into(),
                _ => "counted".into(),
            },
            last_report_age_seconds: seconds(p.last_report_age.as_ref()),
            node_name: p.node_name,
            zone: p.zone,
            last_sequence: p.last_sequence,
        })
        .collect();
    HealthView {
        fail_open: r.fail_open,
        zones_down: r.zones_down,
        backends,
        probers,
    }
}

/// One probe result in a cell: `ok 2ms`, `http 500 3ms`, `refused 0ms`.
fn cell(o: &ObservationView) -> String {
    let what = match (o.ok, o.http_status) {
        (true, _) => "ok".to_owned(),
        (false, Some(code)) => format!("http {code}"),
        (false, None) => o.reason.replace('_', " "),
    };
    format!("{}: {what} {}", o.kind, duration_text(o.latency_seconds))
}

/// A backend's votes per zone: `a=up (2/0/0) b=down (0/0/2, 1 ignored)`.
fn votes_cell(b: &BackendView) -> String {
    b.zones
        .iter()
        .map(|z| {
            let mut s = format!(
                "{}={} ({}/{}/{}",
                z.zone, z.verdict, z.up, z.not_ready, z.down
            );
            if z.ignored > 0 {
                s.push_str(&format!(", {} ignored", z.ignored));
            }
            s.push(')');
            s
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn table(v: &HealthView) -> String {
    let mut out = output::fields(&[
        (
            "fail-open",
            if v.fail_open {
                "YES: every backend looks down; the front routes to all of them (ALERT)".into()
            } else {
                "no".into()
            },
        ),
        (
            "zones down",
            if v.zones_down.is_empty() {
                "none".into()
            } else {
                v.zones_down.join(", ")
            },
        ),
    ]);
    out.push('\n');
    let rows: Vec<Vec<String>> = v
        .backends
        .iter()
        .map(|b| {
            let votes = votes_cell(b);
            vec![
                b.id.clone(),
                b.zone.clone(),
                b.verdict.clone(),
                b.since.clone().unwrap_or_else(|| "-".into()),
                if votes.is_empty() { "-".into() } else { votes },
                b.reason.clone(),
            ]
        })
        .collect();
    out.push_str(&output::table(
        &[
            "BACKEND",
            "ZONE",
            "VERDICT",
            "SINCE",
            "VOTES (UP/NOT-READY/DOWN)",
            "REASON",
        ],
        &rows,
    ));
    out.push('\n');
    let rows: Vec<Vec<String>> = v
        .backends
        .iter()
        .flat_map(|b| {
            b.probes.iter().map(|p| {
                vec![
                    b.id.clone(),
                    p.prober.clone(),
                    p.zone.clone(),
                    if p.counted { "yes".into() } else { "no".into() },
                    p.latest.iter().map(cell).collect::<Vec<_>>().join(", "),
                ]
            })
        })
        .collect();
    out.push_str(&output::table(
        &["BACKEND", "PROBER", "ZONE", "COUNTED", "LATEST PROBES"],
        &rows,
    ));
    out.push('\n');
    let rows: Vec<Vec<String>> = v
        .probers
        .iter()
        .map(|p| {
            vec![
                p.node_name.clone(),
                p.zone.clone(),
                p.state.clone(),
                duration_text(p.last_report_age_seconds),
                p.last_sequence.to_string(),
            ]
        })
        .collect();
    out.push_str(&output::table(
        &["PROBER", "ZONE", "STATE", "LAST REPORT", "SEQUENCE"],
        &rows,
    ));
    out
}

impl HealthArgs {
    /// Runs `bulwarkctl health` against the LB endpoints.
    pub async fn run(&self, svc: &Service<'_>, format: OutputFormat) -> Result<(), CliError> {
        let req = lb::GetHealthRequest {
            backend_id: self.backend.clone().unwrap_or_default(),
        };
        let r = svc
            .send(LoadBalancerClient::new, req, |mut c, r| async move {
                c.get_health(r).await
            })
            .await?;
        output::print(format, &view(r), table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_votes_probes_probers_and_the_alert() {
        let r = lb::GetHealthResponse {
            backends: vec![lb::BackendHealth {
                backend_id: "cp-1".into(),
                address: "10.0.0.1:6443".into(),
                zone: "a".into(),
                verdict: Some(lb::VerdictStatus {
                    verdict: lb::Verdict::Down as i32,
                    reason: "down in 2/2 zones (connection refused)".into(),
                    since: None,
                }),
                zones: vec![lb::ZoneVotes {
                    zone: "a".into(),
                    zone_verdict: lb::Verdict::Down as i32,
                    up: 0,
                    not_ready: 0,
                    down: 1,
                    ignored: 1,
                }],
                probers: vec![lb::ProberView {
                    prober: "p-a".into(),
                    zone: "a".into(),
                    counted: true,
                    latest: vec![lb::Observation {
                        kind: lb::ProbeKind::Readyz as i32,
                        ok: false,
                        reason: lb::ProbeReason::ConnectionRefused as i32,
                        latency: Some(prost_types::Duration {
                            seconds: 0,
                            nanos: 2_000_000,
                        }),
                        ..Default::default()
                    }],
                }],
            }],
            probers: vec![lb::ProberStatus {
                node_name: "p-a".into(),
                zone: "a".into(),
                isolated: true,
                stale: false,
                last_report_age: None,
                last_sequence: 7,
            }],
            fail_open: true,
            zones_down: vec!["a".into()],
        };
        let v = view(r);
        let json = output::render(OutputFormat::Json, &v, table).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        let probe = &json["backends"][0]["probes"][0]["latest"][0];
        assert_eq!(probe["latency_seconds"], 0.002, "{json}");
        assert!(json["backends"][0]["since"].is_null(), "{json}");
        assert!(
            json["probers"][0]["last_report_age_seconds"].is_null(),
            "{json}"
        );
        let text = table(&v);
        for needle in [
            "fail-open:  YES",
            "zones down: a",
            "cp-1     a     down",
            "a=down (0/0/1, 1 ignored)",
            "readyz: connection refused 2ms",
            "p-a     a     isolated",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
    }
}
