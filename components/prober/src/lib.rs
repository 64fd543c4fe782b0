//! bulwark-prober: probes every apiserver replica (`/readyz` and `/livez`,
//! separately) and every etcd member from its own zone, and streams what it
//! sees to the bulwark-lb leader, which aggregates the views of all probers
//! into the verdicts the front routes by (`bulwark_lb::health`).
//!
//! The data flows one way through the modules:
//!
//! - [`config`]: the `ProberConfiguration` file: targets, timing, endpoints;
//! - [`probe`]: one probe (HTTPS GET or TCP connect) and its classified
//!   [`probe::Outcome`];
//! - [`check`]: a probe on a schedule with fall/rise debouncing and a fast
//!   interval while in transition;
//! - [`observations`]: the latest settled observation per check, where
//!   checks write and the reporter reads (coalescing, never blocking);
//! - [`report`]: the `ProbeReports` stream to the LB leader (FULL, CHANGES,
//!   HEARTBEAT; leader hints; backoff);
//! - `metrics`: `bulwark_prober_*`.
//!
//! [`run`] wires them together with the admin server; `main.rs` only parses
//! flags, loads the config, binds and calls it.

pub mod check;
pub mod config;
pub mod metrics;
pub mod observations;
pub mod probe;
pub mod report;

use bulwark_common::admin::{self, Health};
use bulwark_common::tls::TlsError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ProberConfig;

use crate::check::{BuildError, Check};
use crate::observations::Observations;
use crate::report::Reporter;

/// Why the prober could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A check could not be built (TLS files, addresses).
    #[error("cannot set up the checks: {0}")]
    Checks(#[from] BuildError),
    /// The report identity could not be loaded.
    #[error("report.tls: {0}")]
    ReportTls(#[source] TlsError),
    /// The admin server failed.
    #[error("admin server: {0}")]
    Admin(#[source] std::io::Error),
}

/// Readiness check names on the admin server.
const READY_PROBING: &str = "probing";
const READY_LEADER: &str = "lb-leader";

/// Runs the prober until `shutdown` is cancelled: every check, the reporter
/// (when endpoints are configured) and, when given a listener, the admin
/// server. `/readyz` passes once the checks run and a stream to the LB
/// leader is acknowledged (without endpoints: once the checks run).
pub async fn run(
    config: ProberConfig,
    admin_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let table = Observations::new();
    let (checks, tls_sources) = Check::from_config(&config)?;
    let health = Health::new();
    health.set_ready(READY_PROBING, Err("checks not started".into()));
    let identity = report::identity(&config.node_name, &config.zone);
    let reporter = if config.report.endpoints.is_empty() {
        None
    } else {
        Some(
            Reporter::new(identity.clone(), &config.report, table.clone())
                .map_err(RunError::ReportTls)?,
        )
    };

    let tracker = TaskTracker::new();
    let tasks = shutdown.child_token();
    tracing::info!(
        node = %identity.node_name,
        zone = %identity.zone,
        instance = %identity.instance_id,
        checks = checks.len(),
        endpoints = config.report.endpoints.len(),
        "prober starting"
    );
    for check in checks {
        tracker.spawn(check.run(table.clone(), tasks.child_token()));
    }
    for source in tls_sources {
        tracker.spawn(bulwark_common::tls::reload::follow(
            source,
            "prober",
            bulwark_common::tls::reload::RELOAD_INTERVAL,
            tasks.child_token(),
        ));
    }
    health.set_ready(READY_PROBING, Ok(()));

    if let Some(reporter) = reporter {
        health.set_ready(READY_LEADER, Err("not connected to the LB leader".into()));
        let mut leader = reporter.leader();
        let h = health.clone();
        let token = tasks.child_token();
        tracker.spawn(async move {
            loop {
                let state = match leader.borrow_and_update().as_deref() {
                    Some(_) => Ok(()),
                    None => Err("not connected to the LB leader".to_owned()),
                };
                h.set_ready(READY_LEADER, state);
                tokio::select! {
                    r = leader.changed() => if r.is_err() { return },
                    _ = token.cancelled() => return,
                }
            }
        });
        tracker.spawn(reporter.tls().clone().follow(
            "prober",
            bulwark_common::tls::reload::RELOAD_INTERVAL,
            tasks.child_token(),
        ));
        tracker.spawn(reporter.run(tasks.child_token()));
    }

    let admin = admin_listener.map(|listener| {
        tokio::spawn(admin::serve(
            listener,
            health.clone(),
            Some(bulwark_common::telemetry::metrics_handle()),
            tasks.child_token(),
        ))
    });

    let result = match admin {
        Some(mut admin) => tokio::select! {
            _ = shutdown.cancelled() => {
                tasks.cancel();
                match admin.await {
                    Ok(r) => r.map_err(RunError::Admin),
                    Err(e) => Err(RunError::Admin(std::io::Error::other(e))),
                }
            }
            r = &mut admin => {
                // The admin server only ends early on an error.
                tasks.cancel();
                match r {
                    Ok(r) => r.map_err(RunError::Admin),
                    Err(e) => Err(RunError::Admin(std::io::Error::other(e))),
                }
            }
        },
        None => {
            shutdown.cancelled().await;
            tasks.cancel();
            Ok(())
        }
    };
    tracker.close();
    tracker.wait().await;
    tracing::info!("prober stopped");
    result
}
