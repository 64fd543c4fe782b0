//! The admin HTTP server every daemon runs: `/livez`, `/readyz` and
//! `/metrics`, for the kubelet's probes and for Prometheus, and
//! `/debug/workers` (JSON: each long-running task's state, last success
//! and last error, from [`Workers`]) for an operator.
//!
//! It is plain HTTP on a loopback or node address (kubelet probes of static
//! pods speak plain HTTP to the host network), carries no secrets, and
//! changes nothing. Health is a set of named checks each daemon updates;
//! `?verbose` lists them the way kube-apiserver's `/readyz?verbose` does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::workers::Workers;

/// The `admin:` section every daemon's config has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminConfig {
    /// Where `/livez`, `/readyz`, `/metrics` and `/debug/workers` listen
    /// (plain HTTP).
    pub address: SocketAddr,
}

impl AdminConfig {
    /// The default: every address of the node on `port`.
    ///
    /// Why not loopback: a Prometheus running in the cluster scrapes from
    /// a pod network address, and the daemons are static pods on the host
    /// network, so a loopback-only `/metrics` is unreachable for it (the
    /// kubelet's probes reach either). The trade-off, written down in
    /// docs/OPERATIONS.md: these endpoints have no authentication, so
    /// whoever reaches the node's port reads the metrics (backend
    /// addresses, verdicts, backup times) and the readiness reasons. They
    /// change nothing and carry no secret; set `admin.address` to
    /// `127.0.0.1:<port>` (or firewall the port) where that matters.
    pub fn on_all_addresses(port: u16) -> Self {
        Self {
            address: SocketAddr::from(([0, 0, 0, 0], port)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum CheckState {
    Ok,
    Failing(String),
}

#[derive(Debug, Default)]
struct Checks {
    live: BTreeMap<String, CheckState>,
    ready: BTreeMap<String, CheckState>,
}

/// Named liveness and readiness checks, shared between the daemon (which
/// sets them) and the admin server (which reports them). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Health {
    checks: Arc<Mutex<Checks>>,
}

impl Health {
    /// A health set with no checks (live and ready).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets readiness check `name`: `Ok(())` passes, `Err(reason)` fails.
    pub fn set_ready(&self, name: &str, state: Result<(), String>) {
        self.update(|c| &mut c.ready, name, state);
    }

    /// Sets liveness check `name`. Failing liveness makes the kubelet restart
    /// the pod: only for states the process cannot recover from by itself.
    pub fn set_live(&self, name: &str, state: Result<(), String>) {
        self.update(|c| &mut c.live, name, state);
    }

    fn update(
        &self,
        which: impl FnOnce(&mut Checks) -> &mut BTreeMap<String, CheckState>,
        name: &str,
        state: Result<(), String>,
    ) {
        let state = match state {
            Ok(()) => CheckState::Ok,
            Err(reason) => CheckState::Failing(reason),
        };
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        which(&mut checks).insert(name.to_owned(), state);
    }

    /// Whether every readiness check passes.
    pub fn is_ready(&self) -> bool {
        self.report(|c| &c.ready).0
    }

    fn report(
        &self,
        which: impl FnOnce(&Checks) -> &BTreeMap<String, CheckState>,
    ) -> (bool, String) {
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let mut ok = true;
        let mut text = String::new();
        for (name, state) in which(&checks) {
            match state {
                CheckState::Ok => text.push_str(&format!("[+]{name} ok\n")),
                CheckState::Failing(reason) => {
                    ok = false;
                    text.push_str(&format!("[-]{name} failed: {reason}\n"));
                }
            }
        }
        (ok, text)
    }
}

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: Option<PrometheusHandle>,
    workers: Workers,
}

#[derive(Deserialize)]
struct ProbeQuery {
    verbose: Option<String>,
}

fn probe_response(ok: bool, detail: String, verbose: bool, which: &str) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = if verbose || !ok {
        let verdict = if ok { "passed" } else { "failed" };
        format!("{detail}{which} check {verdict}\n")
    } else {
        "ok".to_owned()
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn livez(State(s): State<AdminState>, Query(q): Query<ProbeQuery>) -> Response {
    let (ok, detail) = s.health.report(|c| &c.live);
    probe_response(ok, detail, q.verbose.is_some(), "livez")
}

async fn readyz(State(s): State<AdminState>, Query(q): Query<ProbeQuery>) -> Response {
    let (ok, detail) = s.health.report(|c| &c.ready);
    probe_response(ok, detail, q.verbose.is_some(), "readyz")
}

async fn debug_workers(State(s): State<AdminState>) -> Response {
    let body = serde_json::json!({ "workers": s.workers.list() }).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    match &s.metrics {
        Some(handle) => {
            crate::telemetry::scrape::publish_all();
            let mut body = handle.render();
            if let Some(stats) = crate::telemetry::process::read() {
                body.push_str(&crate::telemetry::process::render(&stats));
            }
            (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                body,
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    metrics_handle: Option<PrometheusHandle>,
    workers: Workers,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/healthz", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/workers", get(debug_workers))
        .with_state(AdminState {
            health,
            metrics: metrics_handle,
            workers,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn probes_follow_checks_and_metrics_render() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new();
        let token = CancellationToken::new();
        let handle = crate::telemetry::metrics_handle();
        metrics::gauge!("bulwark_common_admin_test").set(1.0);
        let workers = Workers::new();
        workers.worker("scheduler").set_state("leading");
        let server = tokio::spawn(serve(
            listener,
            health.clone(),
            Some(handle),
            workers,
            token.clone(),
        ));

        health.set_ready("raft", Err("no leader".into()));
        assert_eq!(get(addr, "/livez").await, (200, "ok".into()));
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("[-]raft failed: no leader"), "{body}");

        health.set_ready("raft", Ok(()));
        assert_eq!(get(addr, "/readyz").await, (200, "ok".into()));
        let (_, body) = get(addr, "/readyz?verbose").await;
        assert!(
            body.contains("[+]raft ok") && body.contains("readyz check passed"),
            "{body}"
        );

        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("bulwark_common_admin_test 1"), "{body}");
        assert!(body.contains("\nprocess_resident_memory_bytes "), "{body}");

        let (code, body) = get(addr, "/debug/workers").await;
        assert_eq!(code, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["workers"][0]["name"], "scheduler", "{json}");
        assert_eq!(json["workers"][0]["state"], "leading", "{json}");

        token.cancel();
        server.await.unwrap().unwrap();
    }
}
