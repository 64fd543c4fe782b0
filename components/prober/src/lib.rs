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
//! [`run`] wires them together with the admin server as tasks of a
//! [`Shutdown`]; [`Prober`] is the daemon the shared `main`
//! (`bulwark_common::daemon::main`) runs, so `main.rs` only parses flags.

pub mod check;
pub mod config;
pub mod metrics;
pub mod observations;
pub mod probe;
pub mod report;

use std::time::Duration;

use anyhow::Context as _;
use bulwark_common::admin::{self, Health};
use bulwark_common::daemon::Daemon;
use bulwark_common::listen;
use bulwark_common::shutdown::{Shutdown, next_change};
use bulwark_common::telemetry::LoggingConfig;
use bulwark_common::tls::TlsError;
use bulwark_common::tls::reload::spawn_follow;
use tokio::net::TcpListener;

pub use config::ProberConfig;

use crate::check::{BuildError, Check};
use crate::observations::Observations;
use crate::report::Reporter;

/// Why the prober could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A check could not be built (TLS files, addresses).
    #[error("cannot set up the checks: {0}")]
    Checks(#[from] BuildError),
    /// The report identity could not be loaded.
    #[error("report.tls: {0}")]
    ReportTls(#[source] TlsError),
}

/// Readiness check names on the admin server.
const READY_PROBING: &str = "probing";
const READY_LEADER: &str = "lb-leader";

/// How long a graceful shutdown may take: checks stop at once, the report
/// stream closes, the admin server drains.
const GRACE: Duration = Duration::from_secs(5);

/// The sockets [`run`] serves on, bound by the caller.
#[derive(Debug, Default)]
pub struct Listeners {
    /// `/livez`, `/readyz`, `/metrics`, `/debug/workers`; none in tests
    /// that do not read them.
    pub admin: Option<TcpListener>,
}

/// Starts the prober as tasks of `shutdown`: every check (a worker named
/// `check <target>/<kind>`), the reporter (when endpoints are configured)
/// and, when given a listener, the admin server. Returns once they run.
/// `/readyz` passes once the checks run and a stream to the LB leader is
/// acknowledged (without endpoints: once the checks run). A check or the
/// reporter that panics or ends before shutdown stops the prober.
pub async fn run(
    config: ProberConfig,
    listeners: Listeners,
    shutdown: &Shutdown,
) -> Result<(), RunError> {
    // Installs the recorder before any worker counts anything (a counter
    // bumped before it exists is lost).
    let metrics = bulwark_common::telemetry::metrics_handle();
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
                .map_err(RunError::ReportTls)?
                .with_worker(shutdown.worker(report::WORKER)),
        )
    };

    tracing::info!(
        node = %identity.node_name,
        zone = %identity.zone,
        instance = %identity.instance_id,
        checks = checks.len(),
        endpoints = config.report.endpoints.len(),
        "prober starting"
    );
    for check in checks {
        let name = check.worker_name();
        let check = check.with_worker(shutdown.worker(name.clone()));
        let (table, token) = (table.clone(), shutdown.token());
        shutdown.spawn_critical(name, async move {
            check.run(table, token).await;
            Ok(())
        });
    }
    // The probe clients' certificates (kubeadm renews them) follow their
    // files.
    for source in tls_sources {
        spawn_follow(source, "prober", shutdown);
    }
    health.set_ready(READY_PROBING, Ok(()));

    if let Some(reporter) = reporter {
        spawn_reporter(reporter, &health, shutdown);
    }
    if let Some(listener) = listeners.admin {
        let (health, workers, token) = (health, shutdown.workers().clone(), shutdown.token());
        shutdown.spawn_critical("admin", async move {
            admin::serve(listener, health, Some(metrics), workers, token)
                .await
                .context("admin server")
        });
    }
    Ok(())
}

/// The reporter, the readiness check that follows its leader, and the
/// reload of its certificate.
fn spawn_reporter(reporter: Reporter, health: &Health, shutdown: &Shutdown) {
    health.set_ready(READY_LEADER, Err("not connected to the LB leader".into()));
    spawn_follow(reporter.tls().clone(), "prober", shutdown);
    let mut leader = reporter.leader();
    let h = health.clone();
    let token = shutdown.token();
    // Critical: a /readyz nobody updates any more would lie.
    shutdown.spawn_critical("leader readiness", async move {
        loop {
            let state = match leader.borrow_and_update().as_deref() {
                Some(_) => Ok(()),
                None => Err("not connected to the LB leader".to_owned()),
            };
            h.set_ready(READY_LEADER, state);
            if !next_change(&token, leader.changed()).await {
                return Ok(());
            }
        }
    });
    let token = shutdown.token();
    shutdown.spawn_critical(report::WORKER, async move {
        reporter.run(token).await;
        Ok(())
    });
}

/// `bulwark-prober` as the shared daemon `main` runs it.
#[derive(Debug)]
pub enum Prober {}

impl Daemon for Prober {
    const NAME: &'static str = "bulwark-prober";
    type Config = ProberConfig;
    type Listeners = Listeners;

    fn logging(config: &ProberConfig) -> &LoggingConfig {
        &config.logging
    }

    fn grace(_: &ProberConfig) -> Duration {
        GRACE
    }

    fn register_metrics(config: &ProberConfig) {
        metrics::register(config);
    }

    async fn bind(config: &ProberConfig) -> anyhow::Result<Listeners> {
        let admin = listen::bind(config.admin.address, "admin (admin.address)").await?;
        Ok(Listeners { admin: Some(admin) })
    }

    async fn run(
        config: ProberConfig,
        listeners: Listeners,
        shutdown: &Shutdown,
    ) -> anyhow::Result<()> {
        run(config, listeners, shutdown).await.map_err(Into::into)
    }
}
